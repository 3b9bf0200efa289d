"""AnnealedSMC with its defaults against Pyro's NUTS on the 1-D gap network, in one run.

The model is the user-written 1-H-1 tanh PyroModule of :mod:`gap_reference` (the style of Pyro's
Bayesian-regression tutorial, its own priors, noise 0.1). NUTS's draws come from the stored run
(:func:`gap_reference.nuts_reference`, recomputed when the file is missing or made with other
settings); AnnealedSMC runs here with nothing but the model, ``AnnealedSMC(model, seed=s)``, on
each seed. For each run it prints the test NLL on the grid ``[-3, 3]``, the NLL on ``[-2, 2]``
(the data and the gap), the mean predictive sd inside the gap, the time, and the ratios against
NUTS beside the targets: NLL within 0.1 nats, in-gap sd within 20%, at least 50x less time.

``--learn-noise`` runs the same comparison on the model with a latent noise scale
(``TanhBNN(hidden, noise=None)``, ``sigma ~ HalfNormal(1)``; NUTS's draws stored apart) and prints
the noise posterior's mean and sd beside NUTS's; the target is a mean within 20% of NUTS's.

The grid's NLL is decided beyond the data (``|x| > 2``) by the few draws that bend toward the
truth; NUTS runs of the same problem differ there by several tenths of a nat (see
``docs/measured.md``), so the ``[-2, 2]`` NLL is printed beside it.

    python benchmarks/smc_gap.py                     # 1-20-1, 100 points, seeds 0 and 1
    python benchmarks/smc_gap.py --hidden 10 --n 40 --warmup 200 --samples 300 --seeds 0
    python benchmarks/smc_gap.py --learn-noise --warmup 200 --samples 200   # the noise posterior
    python benchmarks/smc_gap.py --start laplace     # particles from an AutoDiagonalLaplace fit
"""

from __future__ import annotations

import argparse
import time
import warnings

import pyro
import torch
from pyro.infer import Predictive

import pyro_subnet as ps
from gap_reference import NOISE, TanhBNN, gap_data, gap_scores, nuts_reference


def smc_run(hidden: int, ds, seed: int, noise=NOISE, start: str = "auto"):
    """``(draws, mu draws on the test grid, seconds, warnings)`` of ``AnnealedSMC(model)`` on the
    gap data; ``noise=None`` gives the model a latent noise scale; ``start`` is the sampler's
    (``"auto"``, its default: a Laplace start where the noise is learned, the prior otherwise; the
    Laplace fit's time is counted)."""
    pyro.set_rng_seed(seed)
    model = TanhBNN(hidden, noise=noise)
    smc = ps.infer.AnnealedSMC(model, seed=seed, progress=False, start=start)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        smc.run(ds.x_train, ds.y_train)
    seconds = time.perf_counter() - t0
    draws = smc.get_samples()
    mu = Predictive(model, draws, return_sites=["_RETURN"])(ds.x_test)["_RETURN"].detach()
    return draws, mu, seconds, [str(w.message) for w in caught]


def learned_noise(args, ds):
    """The noise posterior of AnnealedSMC's defaults against NUTS's, on the latent-noise model."""
    ref = nuts_reference(args.hidden, args.n, args.warmup, args.samples, learn_noise=True)
    nuts_sigma = ref["sigma"].double()
    print(f"1-{args.hidden}-1 tanh, {args.n} points, latent noise (truth {NOISE}); NUTS ({args.warmup} warm-up + "
          f"{args.samples} draws, stored {ref['made']}): sigma mean {nuts_sigma.mean():.4f}, sd "
          f"{nuts_sigma.std():.4f}, {ref['seconds']:.0f} s")
    for seed in args.seeds:
        draws, _, seconds, caught = smc_run(args.hidden, ds, seed, noise=None, start=args.start)
        sigma = draws["sigma"].detach().double().reshape(-1)
        ratio = float(sigma.mean() / nuts_sigma.mean())
        speed = ref["seconds"] / seconds
        print(f"AnnealedSMC {label(args)}, seed {seed}: sigma mean {sigma.mean():.4f} ({ratio:.3f}x NUTS), sd "
              f"{sigma.std():.4f} ({float(sigma.std() / nuts_sigma.std()):.2f}x NUTS), {seconds:.1f} s "
              f"({speed:.0f}x faster)")
        print(f"  target (mean within 20%): {'met' if abs(ratio - 1) <= 0.2 else 'NOT MET'}"
              + (f"; warnings: {len(caught)}" if caught else ""))


def label(args) -> str:
    return "defaults" if args.start == "auto" else f"start={args.start!r}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=20)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=400, help="NUTS warm-up of the stored reference")
    parser.add_argument("--samples", type=int, default=600, help="NUTS draws of the stored reference")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--learn-noise", action="store_true", help="the latent-noise model's noise posterior")
    parser.add_argument("--start", choices=("auto", "prior", "laplace"), default="auto",
                        help="AnnealedSMC's start (default: its own default, 'auto')")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ds, in_gap = gap_data(args.n)
    if args.learn_noise:
        return learned_noise(args, ds)
    ref = nuts_reference(args.hidden, args.n, args.warmup, args.samples)
    nuts_nll, nuts_inside, nuts_std = gap_scores(ref["mu"], ds, in_gap)
    print(f"1-{args.hidden}-1 tanh, {args.n} points; NUTS ({args.warmup} warm-up + {args.samples} draws, stored "
          f"{ref['made']}): NLL {nuts_nll:.3f}, on [-2, 2] {nuts_inside:.3f}, in-gap sd {nuts_std:.3f}, "
          f"{ref['seconds']:.0f} s")
    for seed in args.seeds:
        _, mu, seconds, caught = smc_run(args.hidden, ds, seed, start=args.start)
        nll, inside, std = gap_scores(mu, ds, in_gap)
        speed = ref["seconds"] / seconds
        met = {"NLL": abs(nll - nuts_nll) <= 0.1, "NLL [-2,2]": abs(inside - nuts_inside) <= 0.1,
               "sd": abs(std / nuts_std - 1) <= 0.2, "speed": speed >= 50}
        print(f"AnnealedSMC {label(args)}, seed {seed}: NLL {nll:.3f} ({nll - nuts_nll:+.3f}), on [-2, 2] {inside:.3f} "
              f"({inside - nuts_inside:+.3f}), in-gap sd {std:.3f} ({std / nuts_std:.2f}x NUTS), {seconds:.1f} s "
              f"({speed:.0f}x faster)")
        print("  targets: " + ", ".join(f"{k} {'met' if ok else 'NOT MET'}" for k, ok in met.items())
              + (f"; warnings: {len(caught)}" if caught else ""))


if __name__ == "__main__":
    main()
