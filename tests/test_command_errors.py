"""A command given something that does not fit (a missing file, a file that is not a checkpoint)
ends with ``error: MESSAGE`` naming it and exit status 1, not a traceback (``console.exit_on``)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(module: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"jax_corrdiff.{module}", *flags], cwd=REPO, capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize("module", ["prepare", "train"])
def test_missing_data_files(module, tmp_path):
    result = _command(module, "--config=configs/china3km.py", f"--workdir={tmp_path}")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "error: data.target_paths: no file matches '/path/to/china_3km/target_*.nc'" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_a_file_that_is_not_a_checkpoint(tmp_path):
    checkpoint = tmp_path / "model.mdlus"
    checkpoint.write_bytes(b"not an archive")
    result = _command("convert", f"--physicsnemo={checkpoint}", f"--output={tmp_path / 'model'}")
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"error: {checkpoint}" in result.stderr and "not a .mdlus checkpoint" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "model").exists()


def test_generating_before_training(tmp_path):
    result = _command("generate", f"--workdir={tmp_path}", "--input=/nonexistent/era5.nc", f"--output={tmp_path}/o.nc")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"error: {tmp_path} has no diffusion/model: train the diffusion stage first" in result.stderr
