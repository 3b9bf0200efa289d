"""Every tutorial runs, at small settings, as part of the suite."""

import runpy
from pathlib import Path

import matplotlib
import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.py"))


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.setenv("PYRO_SUBNET_QUICK", "1")
    monkeypatch.chdir(tmp_path)  # tutorials write their figures to the working directory
    runpy.run_path(str(path), run_name="__main__")
    assert list(tmp_path.glob("*.png")), "a tutorial shows at least one figure"
