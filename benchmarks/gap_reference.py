"""Pyro's NUTS on the 1-D gap network, run once and kept, so the samplers' benchmarks compare against it.

The problem: a user-written 1-H-1 tanh PyroModule in the style of Pyro's Bayesian-regression
tutorial (prior scale 1 on the first layer and the output bias, ``1/sqrt(H)`` on the output
weights, noise fixed at 0.1) on ``ps.data.gap_regression`` (inputs on ``[-2, -1] U [1, 2]``, a test
grid on ``[-3, 3]``). NUTS is what a user would run on a model this small; it is also slow (about
ten minutes for 400 iterations on one core), so :func:`nuts_reference` stores its draws of the
network's output on the test grid, with the settings that produced them and the time it took, in
``benchmarks/results/nuts_gap_<key>.pt``, and runs NUTS again when the file is missing, was made
with other settings, or ``refresh=True``.

Scores (:func:`gap_scores`): the test NLL of the predictive mixture
:math:`\\frac1S \\sum_s \\mathcal N(y; \\mu_s(x), 0.1^2)` over the grid and over its part on
``[-2, 2]``, and the mean predictive
standard deviation :math:`\\sqrt{\\mathrm{Var}_s \\mu_s(x) + 0.1^2}` inside the gap ``(-1, 1)``.

Usage::

    python benchmarks/gap_reference.py --hidden 20 --warmup 200 --samples 200   # (re)compute and store
    python benchmarks/gap_reference.py --learn-noise     # the same with a latent noise scale
"""

from __future__ import annotations

import argparse
import math
import os
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, Predictive
from pyro.nn import PyroModule, PyroSample
from torch import nn

import pyro_subnet as ps

NOISE = 0.1
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class TanhBNN(PyroModule):
    """The 1-H-1 tanh network of Pyro's Bayesian-regression tutorials, noise fixed at 0.1, or
    with ``noise=None`` a latent noise scale ``sigma ~ HalfNormal(1)`` as in those tutorials."""

    def __init__(self, h=20, noise=NOISE):
        super().__init__()
        self.noise = noise
        self.fc1 = PyroModule[nn.Linear](1, h)
        self.fc1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([h, 1]).to_event(2))
        self.fc1.bias = PyroSample(dist.Normal(0.0, 1.0).expand([h]).to_event(1))
        self.fc2 = PyroModule[nn.Linear](h, 1)
        self.fc2.weight = PyroSample(dist.Normal(0.0, h ** -0.5).expand([1, h]).to_event(2))
        self.fc2.bias = PyroSample(dist.Normal(0.0, 1.0).expand([1]).to_event(1))

    def forward(self, x, y=None):
        mu = self.fc2(torch.tanh(self.fc1(x))).squeeze(-1)
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0)) if self.noise is None else self.noise
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mu, sigma), obs=y)
        return mu


def gap_data(n: int = 100):
    """The data set and the mask of test points inside the gap."""
    ds = ps.data.gap_regression(n=n, noise=NOISE, seed=0)
    return ds, (ds.x_test[:, 0] > -1) & (ds.x_test[:, 0] < 1)


def gap_scores(mu_draws: torch.Tensor, ds, in_gap: torch.Tensor):
    """``(test NLL on the grid, test NLL on [-2, 2], in-gap std)`` of draws ``(S, num_test)`` of
    the network's output. The grid's NLL is dominated by the extrapolation beyond the data
    (``|x| > 2``), where it rests on the few draws that happen to bend toward the truth: two NUTS
    runs of the same model can differ there by several tenths of a nat. ``[-2, 2]`` (the data and
    the gap) is where the posterior, not the tail of a finite sample, decides the score."""
    logp = torch.distributions.Normal(mu_draws.double(), NOISE).log_prob(ds.y_test.double())
    pointwise = -(torch.logsumexp(logp, 0) - math.log(mu_draws.shape[0]))
    inside = ds.x_test[:, 0].abs() <= 2
    std = (mu_draws.double().var(0) + NOISE ** 2).sqrt()
    return float(pointwise.mean()), float(pointwise[inside].mean()), float(std[in_gap].mean())


def nuts_reference(hidden: int = 20, n: int = 100, warmup: int = 200, samples: int = 200, seed: int = 0,
                   refresh: bool = False, path: str = None, learn_noise: bool = False) -> dict:
    """NUTS draws of the output on the test grid (``"mu"``, ``(samples, num_test)``), the
    wall time (``"seconds"``) and the settings, from the stored file or from a new run. With
    ``learn_noise=True`` the model is ``TanhBNN(hidden, noise=None)`` and the draws of its noise
    scale are kept too (``"sigma"``, ``(samples,)``), in a file of their own."""
    settings = {"hidden": hidden, "n": n, "warmup": warmup, "samples": samples, "seed": seed}
    if learn_noise:    # only then, so the fixed-noise files keep matching their settings
        settings["noise"] = "learned"
    path = path or os.path.join(RESULTS, f"nuts_gap_h{hidden}_n{n}_w{warmup}_s{samples}"
                                         f"{'_sigma' if learn_noise else ''}.pt")
    if not refresh and os.path.exists(path):
        stored = torch.load(path, weights_only=False)    # our own file: tensors, numbers, strings
        if stored.get("settings") == settings:
            return stored
    ds, _ = gap_data(n)
    pyro.set_rng_seed(seed)
    model = TanhBNN(hidden, noise=None if learn_noise else NOISE)
    mcmc = MCMC(NUTS(model), num_samples=samples, warmup_steps=warmup, disable_progbar=True)
    t0 = time.perf_counter()
    mcmc.run(ds.x_train, ds.y_train)
    seconds = time.perf_counter() - t0
    draws = mcmc.get_samples()
    mu = Predictive(model, draws, return_sites=["_RETURN"])(ds.x_test)["_RETURN"].detach()
    out = {"settings": settings, "mu": mu, "seconds": seconds, "torch": str(torch.__version__),
           "pyro": pyro.__version__, "made": time.strftime("%Y-%m-%d")}
    if learn_noise:
        out["sigma"] = draws["sigma"].detach().reshape(-1)
    torch.save(out, path)
    return out


def nuts_parser(description: str) -> argparse.ArgumentParser:
    """The options of a NUTS run on the gap network: ``--hidden``, ``--n``, ``--warmup``, ``--samples``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--hidden", type=int, default=20)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--samples", type=int, default=200)
    return parser


def main(argv=None):
    parser = nuts_parser(__doc__.split("\n")[0])
    parser.add_argument("--learn-noise", action="store_true", help="a latent noise scale instead of 0.1")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ref = nuts_reference(args.hidden, args.n, args.warmup, args.samples, refresh=True, learn_noise=args.learn_noise)
    ds, in_gap = gap_data(args.n)
    nll, nll_inside, std = gap_scores(ref["mu"], ds, in_gap)
    print(f"NUTS 1-{args.hidden}-1, {args.n} points: test NLL {nll:.3f} (on [-2, 2] {nll_inside:.3f}), in-gap std "
          f"{std:.3f}, {ref['seconds']:.1f} s")


if __name__ == "__main__":
    main()
