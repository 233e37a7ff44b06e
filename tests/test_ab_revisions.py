"""benchmarks/ab_revisions.py: two revisions' steps timed in alternating pairs."""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import ab_revisions  # noqa: E402


def test_pairs_alternate_and_ratios_are_taken_per_pair():
    # A machine slowing steadily: each step takes 10% longer than the one before. The candidate
    # needs 0.9 s where the baseline needs 1 s, so every ratio between neighbours stays near 0.9
    # while the medians of the two sides drift apart by whichever ran later.
    order, clock = [], [1.0]

    def stepper(side, seconds):
        def step():
            order.append(side)
            clock[0] *= 1.1
            return seconds * clock[0]

        return step

    result = ab_revisions.measure_pairs(stepper("baseline", 1.0), stepper("candidate", 0.9), steps=4)
    assert order == ["baseline", "candidate", "candidate", "baseline"] * 2
    assert result["candidate_over_baseline_per_pair"] == pytest.approx([0.99, 0.9 / 1.1, 0.99, 0.9 / 1.1])
    assert result["candidate_over_baseline"] == pytest.approx((0.99 + 0.9 / 1.1) / 2)
    low, median, high = result["candidate_over_baseline_quartiles"]
    assert low == pytest.approx(0.9 / 1.1) and high == pytest.approx(0.99)
    assert median == pytest.approx(result["candidate_over_baseline"])
    assert result["baseline"]["seconds"] == pytest.approx([1.1, 1.1**4, 1.1**5, 1.1**8])


def test_a_revision_is_exported_as_its_commit_s_files(tmp_path):
    if subprocess.run(["git", "rev-parse"], cwd=ab_revisions.REPOSITORY, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ab_revisions.REPOSITORY, capture_output=True, text=True
    ).stdout.strip()
    assert ab_revisions.export_revision("HEAD", str(tmp_path)) == head
    assert (tmp_path / "jax_corrdiff" / "__init__.py").is_file() and (tmp_path / "benchmarks" / "speed.py").is_file()
    with pytest.raises(SystemExit, match="not a revision"):
        ab_revisions.export_revision("no-such-revision", str(tmp_path))


def test_revisions_and_steps_are_checked(capsys):
    with pytest.raises(SystemExit):
        ab_revisions.parse_args(["HEAD"])
    assert "give a BASELINE and a CANDIDATE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ab_revisions.parse_args(["HEAD~1", "HEAD", "--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err
    for bad in ("{", "[1]"):
        with pytest.raises(SystemExit):
            ab_revisions.parse_args(["HEAD", "HEAD", "--candidate-xla-options", bad])
        assert "--candidate-xla-options" in capsys.readouterr().err
    options = ab_revisions.parse_args(
        ["HEAD", "HEAD", "--candidate-xla-options", '{"xla_cpu_prefer_vector_width": 512}']
    )
    assert options.candidate_xla_options == '{"xla_cpu_prefer_vector_width": 512}'
