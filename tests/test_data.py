import pytest
import torch

import pyro_subnet as ps


@pytest.mark.parametrize("name,n,d,c", [("digits", 1797, 64, 10), ("breast_cancer", 569, 30, 2),
                                        ("wine", 178, 13, 3), ("diabetes", 442, 10, 1)])
def test_loaders_split_and_standardise(name, n, d, c):
    ds = ps.data.load(name)
    assert ds.x_train.shape[0] + ds.x_test.shape[0] == n and ds.num_features == d and ds.num_outputs == c
    assert ds.x_train.mean(0).abs().max() < 1e-5
    sd = ds.x_train.std(0, unbiased=False)
    assert ((sd - 1).abs() < 1e-4).logical_or(sd == 0).all()
    again = ps.data.load(name)
    assert torch.equal(ds.x_test, again.x_test)  # deterministic


def test_gap_regression_has_a_gap_and_two_moons_has_two_classes():
    ds = ps.data.gap_regression(n=80)
    x = ds.x_train[:, 0]
    assert ((x > -1) & (x < 1)).sum() == 0 and (x < -1).sum() == 40
    moons = ps.data.two_moons(n=100)
    assert set(moons.y_train.tolist()) == {0, 1}


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown data set"):
        ps.data.load("mnist")


@pytest.mark.parametrize("name,n_train,n_test,d", [("boston", 455, 51, 13), ("concrete", 927, 103, 8),
                                                   ("energy", 691, 77, 8), ("yacht", 277, 31, 6)])
def test_uci_standard_split(name, n_train, n_test, d):
    ds = ps.data.load_uci(name, split=0)
    assert ds.x_train.shape == (n_train, d) and ds.x_test.shape == (n_test, d)
    assert abs(float(ds.y_train.mean())) < 1e-5 and abs(float(ds.y_train.std(unbiased=False)) - 1) < 1e-4
    assert ps.data.num_splits(name) == 20 and ps.data.hidden_units(name) == 50
    # original units come back exactly
    raw = ds.y_train * ds.y_std + ds.y_mean
    assert raw.min() > 0


def test_conjugate_regression_posterior_and_evidence_satisfy_bayes_rule():
    from torch.distributions import MultivariateNormal, Normal
    ref = ps.data.conjugate_regression(n=40, weights=(0.5, 2.0, -1.0), noise=0.3, prior_scale=0.7)
    theta = torch.tensor([0.1, -0.2, 0.3, 0.4], dtype=torch.float64)   # any point: Bayes' rule holds at every one
    log_lik = Normal(ref.design @ theta, 0.3).log_prob(ref.y).sum()
    log_prior = Normal(0.0, 0.7).log_prob(theta).sum()
    log_post = MultivariateNormal(ref.posterior_mean, ref.posterior_cov).log_prob(theta)
    assert abs(float(log_lik + log_prior - log_post) - ref.log_evidence) < 1e-6   # float64 rounding of inv and det


def test_uci_data_ship_inside_the_package(tmp_path, monkeypatch):
    """A user's install has no ../shared: the package names no path outside itself, and the UCI
    loader works from any working directory."""
    from pathlib import Path
    root = Path(ps.__file__).parent
    offenders = [str(p) for p in root.rglob("*.py") if "../shared" in p.read_text() or '"shared"' in p.read_text()]
    assert offenders == []
    assert (root / "data" / "uci_splits" / "LICENSE").exists()
    monkeypatch.chdir(tmp_path)
    ds = ps.data.load_uci("yacht", split=19)
    assert ds.x_train.shape == (277, 6) and ds.x_test.shape == (31, 6)
    with pytest.raises(ValueError, match="split must be an integer in"):
        ps.data.load_uci("yacht", split=20)
