"""A learned observation noise (``BayesianNet(noise_scale=None)``) in every method: on a linear
model with known noise 0.3 each method must recover it, and the evidence-tuned noise must be
the stationary point of the evidence."""

import math

import pyro
import pytest
import torch
from torch import nn

from pyro_subnet.infer import AutoSampledLaplace, AutoSubnetLaplace
from pyro_subnet.infer.autoguide import prior as prior_lib
from pyro_subnet.infer.curvature import ggn
from pyro_subnet.infer.map import fit_map
from pyro_subnet.infer.mcmc import SGHMC
from pyro_subnet.infer.smc import AnnealedSMC
from pyro_subnet.nn import BayesianNet
from pyro_subnet.subnet import All

TRUE_NOISE = 0.3


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.7 + TRUE_NOISE * torch.randn(400, generator=g, dtype=torch.float64)
    return x, y


def model():
    return BayesianNet(nn.Linear(3, 1).double(), likelihood="regression", noise_scale=None)


def test_map_learns_the_noise(data):
    m = model()
    fit_map(m, *data, num_steps=1500, lr=0.02, batch_size=None, progress=False)
    assert m.noise_scale == pytest.approx(TRUE_NOISE, rel=0.1)


def test_subnet_laplace_evidence_noise_marglik_equals_em(data):
    scales, precs = [], []
    for rule in ("marglik", "em"):
        m = model()
        g = AutoSubnetLaplace(m, subnet=All(), prior_precision=rule, map_steps=1500, map_lr=0.02, batch_size=400,
                              progress=False).fit(*data)
        scales.append(m.noise_scale)
        precs.append(float(g.prior_prec[0]))
    assert scales[0] == pytest.approx(TRUE_NOISE, rel=0.1)
    # Both rules find the same stationary point of the evidence.
    assert scales[0] == pytest.approx(scales[1], rel=1e-3) and precs[0] == pytest.approx(precs[1], rel=1e-2)
    # ...which is a maximum in sigma: log Z drops on either side.
    G1 = g.ggn * m.noise_scale ** 2
    th = g.loc[g.subnet_indices]
    sse = float(((m.network.flat(g.loc, data[0])[:, 0] - data[1]) ** 2).sum())
    z = lambda s: float(prior_lib.log_evidence_noise(torch.tensor(sse), 400, th, g.prior_prec, G1,  # noqa: E731
                                                     torch.tensor(math.log(s), dtype=torch.float64)))
    s = m.noise_scale
    assert z(s) > z(1.05 * s) and z(s) > z(s / 1.05)
    # The stored evidence is the one at the learned noise.
    assert float(g.log_marginal_likelihood()) == pytest.approx(z(s), rel=1e-6)


def test_sampled_laplace_em_noise(data):
    m = model()
    AutoSampledLaplace(m, prior_precision="em", num_posterior_samples=16, map_steps=1500, map_lr=0.02,
                       batch_size=400, progress=False).fit(*data)
    assert m.noise_scale == pytest.approx(TRUE_NOISE, rel=0.1)


def test_sghmc_em_noise(data):
    m = model()
    theta = fit_map(m, *data, num_steps=1500, lr=0.02, batch_size=None, progress=False).theta
    m.likelihood.set_noise_scale(1.0)      # start EM far from the answer
    pyro.set_rng_seed(0)
    kernel = SGHMC(m, step_size=2e-4, friction=0.5, subsample_size=100)
    mcmc = pyro.infer.MCMC(kernel, num_samples=50, warmup_steps=600, disable_progbar=True,
                           initial_params=m.layout.unflatten(theta))
    mcmc.run(*data)
    assert m.noise_scale == pytest.approx(TRUE_NOISE, rel=0.15)
    assert kernel.model.noise_scale == m.noise_scale        # the full-data view (ArviZ) agrees


def test_annealed_smc_noise_latent(data):
    m = model()
    torch.manual_seed(0)
    smc = AnnealedSMC(m, num_particles=64, batch_size=100, seed=0, progress=False)
    smc.run(*data)
    assert smc.noise_samples.shape == (1, 64)
    assert float(smc.noise_samples.mean()) == pytest.approx(TRUE_NOISE, rel=0.15)
    assert smc.get_samples()["weight"].shape == (64, 1, 3)   # the noise is not a weight site
    assert m.noise_scale == pytest.approx(float(smc.noise_samples.pow(2).mean().sqrt()))


def test_log_evidence_of_an_unfactorisable_precision_is_minus_inf_and_differentiable():
    """A tuner probing extreme values can make G + P numerically indefinite: the evidence there is
    -inf, and a backward pass through it still runs (L-BFGS calls backward on every probe)."""
    ggn = -torch.eye(3, dtype=torch.float64) * 10.0
    prior_prec = torch.full((3,), 1e-3, dtype=torch.float64, requires_grad=True)
    value = prior_lib.log_evidence(torch.tensor(0.0, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                                   prior_prec, ggn)
    assert value.item() == -math.inf
    value.backward()
    assert torch.isfinite(prior_prec.grad).all()


def test_log_evidence_of_an_indefinite_precision_with_a_positive_determinant_is_minus_inf():
    """Two negative eigenvalues give a positive determinant: a log-determinant alone would call the
    matrix a precision; the evidence there is -inf."""
    ggn = torch.diag(torch.tensor([-2.0, -2.0, 5.0], dtype=torch.float64))
    prior_prec = torch.ones(3, dtype=torch.float64)
    value = prior_lib.log_evidence(torch.tensor(0.0, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                                   prior_prec, ggn)
    assert value.item() == -math.inf


def test_float32_ggn_rounding_under_a_small_noise_is_summed_again_in_float64():
    """More weights than data, a small noise, a weak prior: the float32 sum of outer products has
    negative eigenvalues of order 1e-7 of its largest (which is ~N / sigma^2), far below -p, so the
    float32 precision is indefinite. The guide sums the GGN again in float64 and its posterior is
    that of the same model fitted in float64."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 5, generator=g)
    y = torch.sin(x[:, 0]) + 0.01 * torch.randn(30, generator=g)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 30), nn.Tanh(), nn.Linear(30, 1))       # 211 weights, 30 points
    theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    fits = {}
    for dtype in (torch.float32, torch.float64):
        m = BayesianNet(net.to(dtype), likelihood="regression", noise_scale=1e-3)
        guide = AutoSubnetLaplace(m, subnet=All(), prior_precision=1.0, progress=False)
        guide.fit(x.to(dtype), y.to(dtype), map_theta=theta.to(dtype))
        fits[dtype] = guide
    f32 = fits[torch.float32]
    assert f32.ggn.dtype == torch.float64          # the retry's GGN, kept in float64
    summed32 = ggn(f32.bridge.network, f32.bridge.likelihood, theta, x)
    assert summed32.dtype == torch.float32
    eye = torch.eye(summed32.shape[0], dtype=torch.float64)
    assert torch.linalg.eigvalsh(summed32.double() + eye).min() < 0     # the float32 sum is no precision
    cov = {d: (f.scale_tril.double() @ f.scale_tril.double().T) for d, f in fits.items()}
    assert fits[torch.float32].scale_tril.dtype == torch.float32
    assert torch.allclose(cov[torch.float32], cov[torch.float64], atol=1e-4, rtol=1e-3)
