"""Training configs are checked before any work: each bad number is an error naming its key."""

import importlib.util
import os

import demo
import pytest

from jax_corrdiff.training.loop import train_and_evaluate


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("batch_size", 0, r"regression\.training\.batch_size must be > 0, got 0"),
        ("batch_size", -4, r"regression\.training\.batch_size must be > 0, got -4"),
        ("eval_every_steps", 0, r"regression\.training\.eval_every_steps must be > 0, got 0"),
        ("log_every_steps", 0, r"regression\.training\.log_every_steps must be > 0"),
        ("checkpoint_every_steps", 0, r"regression\.training\.checkpoint_every_steps must be > 0"),
        ("eval_batches", 0, r"regression\.training\.eval_batches must be > 0"),
        ("grad_accumulation", 0, r"regression\.training\.grad_accumulation must be > 0"),
        ("total_samples", 3, r"regression\.training\.total_samples=3 is smaller than one batch"),
    ],
)
def test_bad_training_numbers_fail_before_any_work(tmp_path, key, value, message):
    config = demo.get_config("smoke")
    config.stage = "regression"
    config.regression.training[key] = value
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(config, str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing prepared, compiled or written


def test_the_diffusion_stage_is_checked_too(tmp_path):
    config = demo.get_config("smoke")
    config.diffusion.training.eval_every_steps = 0
    with pytest.raises(ValueError, match=r"diffusion\.training\.eval_every_steps must be > 0"):
        train_and_evaluate(config, str(tmp_path))


def test_a_typo_in_a_config_file_fails_where_it_is_set(tmp_path):
    config_file = tmp_path / "typo.py"
    config_file.write_text(
        "from jax_corrdiff.config import base_config\n"
        "def get_config():\n"
        "    config = base_config()\n"
        "    config.regression.training.learning_rate = 5.0  # the key is `lr`\n"
        "    return config\n"
    )
    spec = importlib.util.spec_from_file_location("typo", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(AttributeError, match="learning_rate"):
        module.get_config()
