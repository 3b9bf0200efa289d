"""SGHMC with its defaults (no step size: warm-up chooses it) against exact answers and NUTS.

1. Conjugate Bayesian linear regression (closed-form posterior), full batch and mini-batches
   with N/B = 4, two chains: the largest error of the posterior means in posterior standard
   deviations, the variance ratios, R-hat. Targets: means within 0.1 sd, variances within 20%,
   R-hat < 1.05.
2. A user-written 1-20-1 tanh PyroModule on 1-D gap data (100 points, noise 0.1, prior scales 1
   on the first layer and 1/sqrt(20) on the output weights), SGHMC defaults against Pyro's NUTS
   run here on the same model: test NLL (noise 0.1 included) on the test grid, the predictive
   standard deviation inside the gap, wall time. Targets: NLL within 0.1 nats of NUTS's, in-gap
   std within 20%, at most 1/50 of NUTS's time.

Usage::

    python benchmarks/sghmc_defaults.py            # both parts
    python benchmarks/sghmc_defaults.py --quick    # shorter chains, smaller NUTS run
"""

from __future__ import annotations

import argparse
import time

import arviz as az
import pyro
import torch
from pyro.infer import MCMC, NUTS, Predictive
from torch import nn

import pyro_subnet as ps
from gap_reference import TanhBNN, gap_data, gap_scores   # benchmarks/ is on the path of a script run from it
from pyro_subnet.infer import SGHMC


def conjugate(quick: bool):
    n, d, sigma = 100, 3, 1.0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64) + sigma * torch.randn(n, generator=g, dtype=torch.float64)
    precision = x.T @ x / sigma ** 2 + torch.eye(d, dtype=torch.float64)
    cov = torch.linalg.inv(precision)
    mean = cov @ x.T @ y / sigma ** 2
    print("1. conjugate regression (N=100, D=3), SGHMC defaults, 2 chains")
    for batch in (None, 25):
        model = ps.nn.BayesianNet(nn.Linear(d, 1, bias=False).double(), likelihood="regression",
                                  noise_scale=sigma, prior_scale=1.0)
        pyro.set_rng_seed(0)
        kernel = SGHMC(model, subsample_size=batch, steps_per_sample=10)
        mcmc = MCMC(kernel, num_samples=500 if quick else 2000, warmup_steps=300, num_chains=2, disable_progbar=True)
        t0 = time.perf_counter()
        mcmc.run(x, y)
        secs = time.perf_counter() - t0
        w = mcmc.get_samples(group_by_chain=True)["weight"].reshape(2, -1, d)
        flat = w.reshape(-1, d)
        err = float(((flat.mean(0) - mean).abs() / cov.diag().sqrt()).max())
        ratio = (flat.var(0) / cov.diag()).tolist()
        rhat = float(az.rhat(az.convert_to_dataset(w.numpy()))["x"].values.max())
        ok = err < 0.1 and all(abs(r - 1) < 0.2 for r in ratio) and rhat < 1.05
        label = "full batch" if batch is None else f"N/B = {n // batch}"
        print(f"  {label:<11} step {kernel.adapted_step_size:.2e}  mean error {err:.3f} sd  variance ratios "
              f"{', '.join(f'{r:.3f}' for r in ratio)}  R-hat {rhat:.3f}  {secs:.1f} s  {'OK' if ok else 'MISSED'}")


def against_nuts(quick: bool):
    ds, in_gap = gap_data(100)
    print("\n2. 1-20-1 tanh PyroModule on gap data (100 points): SGHMC defaults against Pyro NUTS")
    pyro.set_rng_seed(0)
    model = TanhBNN()
    nuts = MCMC(NUTS(model), num_samples=200 if quick else 1000, warmup_steps=200 if quick else 500,
                disable_progbar=True)
    t0 = time.perf_counter()
    nuts.run(ds.x_train, ds.y_train)
    t_nuts = time.perf_counter() - t0
    mu = Predictive(model, nuts.get_samples(), return_sites=["_RETURN"])(ds.x_test)["_RETURN"]
    nll_nuts, _, std_nuts = gap_scores(mu, ds, in_gap)
    print(f"  {'NUTS':<28} test NLL {nll_nuts:7.3f}  in-gap std {std_nuts:.3f}  {t_nuts:7.1f} s")
    for batch in (None, 25):
        pyro.set_rng_seed(0)
        model = TanhBNN()
        kernel = SGHMC(model, subsample_size=batch, steps_per_sample=10)
        mcmc = MCMC(kernel, num_samples=300, warmup_steps=500 if quick else 1000, disable_progbar=True)
        t0 = time.perf_counter()
        mcmc.run(ds.x_train, ds.y_train)
        secs = time.perf_counter() - t0
        mu = Predictive(model, mcmc.get_samples(), return_sites=["_RETURN"])(ds.x_test)["_RETURN"]
        nll, _, std = gap_scores(mu, ds, in_gap)
        ok = abs(nll - nll_nuts) <= 0.1 and abs(std / std_nuts - 1) <= 0.2 and secs <= t_nuts / 50
        label = f"SGHMC ({'full batch' if batch is None else f'batch {batch}'})"
        print(f"  {label:<28} test NLL {nll:7.3f}  in-gap std {std:.3f}  {secs:7.1f} s  "
              f"(NLL {nll - nll_nuts:+.3f}, std x{std / std_nuts:.2f}, {t_nuts / secs:.0f}x faster)  "
              f"{'OK' if ok else 'MISSED'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    conjugate(args.quick)
    against_nuts(args.quick)


if __name__ == "__main__":
    main()
