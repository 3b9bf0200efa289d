"""Launch small scripts under ``torchrun`` (2 CPU processes, gloo) from the tests."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def torchrun(tmp_path):
    def run(body: str, nproc: int = 2, timeout: float = 180.0) -> subprocess.CompletedProcess:
        script = tmp_path / "job.py"
        script.write_text(textwrap.dedent(body))
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), str(tmp_path)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    return run
