import json

import pytest

from pyro_subnet.cli import main


def test_quick_run_prints_a_table_and_writes_json_and_png(capsys, tmp_path):
    assert main(["--dataset", "wine", "--quick", "--methods", "map", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("MAP")][0].split()
    accuracy, nll = float(row[1]), float(row[2])
    assert accuracy > 0.85 and nll < 0.5
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dataset"] == "wine"
    assert results["methods"]["MAP"]["accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_arguments_give_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--dataset", "mnist"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid choice" in err
    assert main(["--methods", "nope"]) == 1
    assert "unknown method" in capsys.readouterr().err
