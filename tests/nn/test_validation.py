"""Bad input fails early, in one shared check, with a message that names the problem and the fix."""

import pyro
import pytest
import torch
from pyro.infer import MCMC
from torch import nn

import pyro_subnet as ps


def _classifier(seed=0):
    torch.manual_seed(seed)
    return ps.nn.BayesianNet(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)), "classification")


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, generator=g)
    y = torch.randint(0, 3, (30,), generator=g)
    return x, y


def _methods(model):
    """Each method's entry point on (x, y)."""
    return {
        "laplace": lambda x, y: ps.infer.AutoSubnetLaplace(model, subnet=ps.subnet.LastLayer(), map_steps=5,
                                                           progress=False).fit(x, y),
        "sghmc": lambda x, y: MCMC(ps.infer.SGHMC(model, step_size=1e-4), num_samples=2, warmup_steps=1,
                                   disable_progbar=True).run(x, y),
        "smc": lambda x, y: ps.infer.AnnealedSMC(model, num_particles=4, batch_size=10, progress=False).run(x, y),
        "map": lambda x, y: ps.infer.fit_map(model, x, y, num_steps=2, progress=False),
    }


@pytest.mark.parametrize("method", ["laplace", "sghmc", "smc", "map"])
def test_a_label_outside_the_classes_is_named(method):
    x, y = _data()
    y[4] = 5
    with pytest.raises(ValueError, match=r"lie in \[0, 3\) for a network with 3 outputs.*classes \{0, 1, 2, 5\}"):
        _methods(_classifier())[method](x, y)


@pytest.mark.parametrize("method", ["laplace", "sghmc", "smc", "map"])
def test_the_wrong_number_of_features_names_the_first_layer(method):
    x, y = _data()
    with pytest.raises(ValueError, match=r"shape \(30, 3\).*Linear at '0' with in_features=2"):
        _methods(_classifier())[method](torch.randn(30, 3), y)


def test_nan_inputs_are_refused_by_every_predictive():
    x, y = _data()
    model = _classifier()
    guide = ps.infer.AutoSubnetLaplace(model, subnet=ps.subnet.LastLayer(), map_steps=50, progress=False).fit(x, y)
    bad = x.clone()
    bad[7, 1] = float("nan")
    for predict in (guide.predict, lambda z: guide.predict(z, method="nn"), ps.infer.AnalyticPredictive(model, guide),
                    lambda z: pyro.infer.Predictive(model, guide=guide, num_samples=2)(z)):
        with pytest.raises(ValueError, match="NaN or infinite values .* first at row 7"):
            predict(bad)


def test_regression_targets_must_match_the_outputs():
    torch.manual_seed(0)
    model = ps.nn.BayesianNet(nn.Linear(2, 1), "regression", noise_scale=0.1)
    x = torch.randn(20, 2)
    with pytest.raises(ValueError, match=r"shape \(20, 2\): 2 values per example, but the network has 1 output"):
        MCMC(ps.infer.SGHMC(model, step_size=1e-4), num_samples=2, warmup_steps=1, disable_progbar=True).run(
            x, torch.randn(20, 2))
    # (N, 1) is the same as (N,)
    x_checked, y_checked = ps.nn.validation.check_model_data(model, x, torch.randn(20, 1))
    assert y_checked.shape == (20,)


def test_numpy_and_lists_are_converted_to_the_networks_dtype():
    x, y = _data()
    model = _classifier()
    guide = ps.infer.AutoSubnetLaplace(model, subnet=ps.subnet.LastLayer(), map_steps=50, progress=False)
    guide.fit(x.double().numpy(), y.numpy().tolist())
    assert guide.loc.dtype == torch.float32
    from_numpy = guide.predict(x.double().numpy())
    assert from_numpy.dtype == torch.float32 and torch.equal(from_numpy, guide.predict(x))
    assert torch.equal(guide.predict(x.tolist()), guide.predict(x))


def test_sizes_must_be_positive_integers():
    model = _classifier()
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ps.infer.AutoSubnetLaplace(model, batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ps.infer.AutoSampledLaplace(model, batch_size=-1)
    x, y = _data()
    with pytest.raises(ValueError, match="batch_size must be a positive integer or None"):
        ps.infer.fit_map(model, x, y, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        ps.infer.AnnealedSMC(model, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        ps.infer.AnalyticPredictive(model, pyro.infer.autoguide.AutoNormal(model), batch_size=0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, a NumPy array or a list"):
        ps.nn.validation.check_model_data(model, "not data")
