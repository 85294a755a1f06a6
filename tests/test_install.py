"""A non-editable install (pip install .) ships the configs: run it from outside the source tree."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_non_editable_install_finds_configs(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    assert (target / "aelab" / "configs" / "reg" / "kl.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import aelab.configs; print(aelab.configs.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(target))
    proc = subprocess.run([sys.executable, "-m", "aelab", "train", "trainer.epochs=1", "device=cpu",
                           f"hydra.run.dir={tmp_path / 'run'}"], env=env, cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "metrics.json").is_file()
