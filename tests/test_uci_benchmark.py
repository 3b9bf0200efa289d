"""The UCI benchmark (benchmarks/uci.py) on one split per data set, small settings: loader,
protocol (standardisation on the training split, scores in original units) and sanity of the
learned-noise methods."""

import importlib.util
import io
import math
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_subnet.data.uci import UCI_FOLDERS, load_uci

DATASETS = ("boston", "concrete", "energy", "yacht")


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "uci.py"
    spec = importlib.util.spec_from_file_location("uci_benchmark", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _raw(name, split):
    """The split read straight from the zip the package ships (independently of the loader)."""
    archive = resources.files("pyro_subnet.data").joinpath("uci_splits", f"{UCI_FOLDERS[name]}.zip")
    with zipfile.ZipFile(io.BytesIO(archive.read_bytes())) as z:
        load = lambda f, dtype=float: np.loadtxt(io.BytesIO(z.read(f)), dtype=dtype)  # noqa: E731
        data, feats, target = load("data.txt"), load("index_features.txt", int).reshape(-1), int(load("index_target.txt"))
        tr, te = load(f"index_train_{split}.txt", int), load(f"index_test_{split}.txt", int)
    return data[:, feats], data[:, target], tr, te


@pytest.mark.parametrize("name", DATASETS)
def test_standardised_on_the_training_split_only(name):
    split = 3
    X, y, tr, te = _raw(name, split)
    ds = load_uci(name, split, dtype=torch.float64)
    assert len(ds.x_train) == len(tr) and len(ds.x_test) == len(te)
    assert not set(tr.tolist()) & set(te.tolist())
    # Training statistics map back exactly; the test split is not re-standardised.
    assert ds.y_mean == pytest.approx(y[tr].mean()) and ds.y_std == pytest.approx(y[tr].std())
    np.testing.assert_allclose(ds.y_test.numpy() * ds.y_std + ds.y_mean, y[te], rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(ds.y_train.mean().item(), 0.0, atol=1e-10)
    np.testing.assert_allclose(ds.y_train.std(unbiased=False).item(), 1.0, rtol=1e-10)
    sd = X[tr].std(0)
    keep = sd > 0
    np.testing.assert_allclose(ds.x_train.numpy().mean(0), 0.0, atol=1e-10)
    np.testing.assert_allclose(ds.x_test.numpy()[:, keep], ((X[te] - X[tr].mean(0)) / sd)[:, keep], rtol=1e-8)
    assert abs(ds.y_test.mean().item()) > 1e-6      # standardised with the training mean, not its own


def test_scores_are_in_original_units():
    bench = _bench()
    ds = load_uci("boston", 0, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    mean = ds.y_test + 0.3 * torch.randn(len(ds.y_test), generator=g, dtype=torch.float64)
    var = torch.full_like(mean, 0.2)
    s = bench.test_scores(ds, mean, var)
    y = ds.y_test * ds.y_std + ds.y_mean
    m = mean * ds.y_std + ds.y_mean
    assert s["rmse"] == pytest.approx(float(((m - y) ** 2).mean().sqrt()), rel=1e-10)
    ll = torch.distributions.Normal(m, (var * ds.y_std ** 2).sqrt()).log_prob(y).mean()
    assert s["ll"] == pytest.approx(float(ll), rel=1e-10)
    # = the standardised log-density minus log(y_std)
    ll_std = torch.distributions.Normal(mean, var.sqrt()).log_prob(ds.y_test).mean()
    assert s["ll"] == pytest.approx(float(ll_std) - math.log(ds.y_std), rel=1e-10)


def test_published_rows_are_read():
    ref = _bench().published()
    assert set(ref) == set(DATASETS)
    assert ref["boston"]["mc_dropout"]["ll"] == (-2.40, 0.04) and ref["yacht"]["mc_dropout"]["rmse"] == (0.67, 0.05)
    assert ref["concrete"]["deep_ensemble"]["ll"] == (-3.06, 0.18)


def test_one_split_per_data_set_all_methods(capsys):
    """Every method on split 0 of each set at small settings: finite scores, learned noise, the
    MAP and the evidence-tuned Laplace beat a trivial predictor (the training mean and standard
    deviation), and the table is printed beside MC dropout."""
    bench = _bench()
    torch.set_num_threads(1)
    records = []
    for name in DATASETS:
        ds = load_uci(name, 0)
        out = bench.run_split(name, 0, bench.DEFAULT_METHODS, quick=True)
        assert set(out) == set(bench.DEFAULT_METHODS) | set(bench.PREDICTIVE_ROUTE.values())
        for m, r in out.items():
            assert math.isfinite(r["ll"]) and math.isfinite(r["rmse"]) and r["rmse"] > 0, (name, m, r)
        y = (ds.y_test * ds.y_std + ds.y_mean).double()
        trivial_ll = float(torch.distributions.Normal(ds.y_mean, ds.y_std).log_prob(y).mean())
        trivial_rmse = float(((y - ds.y_mean) ** 2).mean().sqrt())
        assert out["map"]["ll"] > trivial_ll and out["map"]["rmse"] < 0.8 * trivial_rmse, (name, out["map"])
        assert out["subnet_laplace"]["ll"] > trivial_ll + 0.3, (name, out["subnet_laplace"], trivial_ll)
        # The Laplace guide's noise was learned (moved away from the start value 1 and the MAP's).
        assert 0 < out["subnet_laplace"]["noise_scale"] < 0.9
        # pyro.infer.Predictive through each Laplace guide is its GLM predictive (2000 draws).
        for m, route in bench.PREDICTIVE_ROUTE.items():
            assert out[route]["ll"] == pytest.approx(out[m]["ll"], abs=0.05), (name, m, out[route], out[m])
            assert out[route]["rmse"] == pytest.approx(out[m]["rmse"], rel=0.03), (name, m)
        records.append({"dataset": name, "split": 0, "methods": out})
    table = bench.format_table(records, bench.DEFAULT_METHODS, DATASETS)
    assert table.count("MC dropout (publ.)") == 4 and table.count("deep ensemble (publ.)") == 4
    assert "AutoSubnetLaplace" in table and table.count("\n    via Predictive") == 8
    assert "-2.40 ± 0.04" in table


def test_cli_quick_one_split(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "uci.txt"
    js = tmp_path / "splits.jsonl"
    assert bench.main(["--datasets", "yacht", "--splits", "1", "--quick", "--methods", "map,analytic",
                       "--json", str(js), "--out", str(out)]) == 0
    text = out.read_text()
    assert "yacht (1 split)" in text and "AnalyticPredictive" in text and "MC dropout" in text
    assert len(js.read_text().splitlines()) == 1
    assert bench.main(["--methods", "nope"]) == 2
