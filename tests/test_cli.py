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
    for figure in ("reliability.png", "shift_nll.png"):
        assert (tmp_path / figure).read_bytes()[:4] == b"\x89PNG"


def test_every_method_reports_shift_and_ood_scores(capsys, tmp_path):
    """results.json: per method the test scores, one entry per shift level, the OOD AUROC; the
    baselines a user would otherwise pick are methods like the others."""
    assert main(["--dataset", "wine", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    methods = json.loads((tmp_path / "results.json").read_text())["methods"]
    assert {"MAP", "AutoSubnetLaplace", "AutoSampledLaplace", "SGHMC", "SpikeSlabSGHMC", "AnnealedSMC",
            "AnalyticPredictive", "DeepEnsemble", "MCDropout"} == set(methods)
    for name, scores in methods.items():
        for key in ("nll", "accuracy", "ece", "brier", "time_s"):
            assert isinstance(scores[key], float), (name, key)
        assert set(scores["shift"]) == {"noise_0.5", "noise_1", "noise_2"}
        for level in scores["shift"].values():
            assert set(level) == {"nll", "accuracy", "ece"}
        # stronger feature noise costs the MAP-like methods accuracy
        assert scores["shift"]["noise_2"]["accuracy"] < scores["accuracy"] + 1e-9, name
        assert 0.0 <= scores["ood"]["auroc"] <= 1.0 and "auroc_uniform_box" in scores["ood"]


def test_digits_rotations_and_ood_sets(capsys, tmp_path):
    assert main(["--dataset", "digits", "--quick", "--methods", "map,deep_ensemble", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for scores in results["methods"].values():
        assert list(scores["shift"]) == ["rotate_15", "rotate_30", "rotate_45", "rotate_60"]
        nlls = [scores["nll"]] + [scores["shift"][k]["nll"] for k in scores["shift"]]
        assert nlls == sorted(nlls)                              # the larger the rotation, the worse
        assert {"auroc", "auroc_inverted", "auroc_uniform_noise"} == set(scores["ood"])
    assert "nll@rotate_30" in capsys.readouterr().out


def test_bad_arguments_give_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--dataset", "mnist"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid choice" in err
    assert main(["--methods", "nope"]) == 1
    assert "unknown method" in capsys.readouterr().err
