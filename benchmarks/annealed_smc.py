"""Data-annealed SMC against full-batch tempered SMC on a BNN classifier, in one run.

Runs :class:`~pyro_subnet.infer.AnnealedSMC` with ``schedule="full"`` (adaptive likelihood
tempering on all data: the baseline), ``"adaptive"`` and ``"linear"`` (data annealing) on the same
MLP and data, and prints time, gradient passes, examples touched by gradients, test accuracy,
NLL, ECE and log evidence, with the ratios against ``"full"``. Then times one MALA move step
with 1 and with 128 particles (the vectorisation target: 128 particles < 10x one particle).

Targets (issue 6): annealing >= 4x faster than full with accuracy within 1 point and NLL within 5%.

    python benchmarks/annealed_smc.py                  # digits, MLP 64-50-10, 128 particles
    python benchmarks/annealed_smc.py --quick          # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import time

import torch

from pyro_subnet import metrics
from pyro_subnet.data import load
from pyro_subnet.experiment import mlp
from pyro_subnet.infer import AnnealedSMC
from pyro_subnet.infer.smc import AnnealedTarget, DataPath, Move
from pyro_subnet.nn import BayesianNet


def predict(model, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Posterior predictive class probabilities: the particle average of softmax outputs."""
    with torch.no_grad():
        return torch.softmax(model.network.flat_batched(theta, x), -1).mean(0)


def time_move(model, x, y, num_particles: int, repeats: int = 5) -> float:
    """Seconds per MALA move step (one gradient pass on all data) for ``num_particles``."""
    path = DataPath(x.shape[0], None)
    target = AnnealedTarget(model.log_prior, lambda t, a, b: model.log_likelihood(t, x[a:b], y[a:b]), path)
    log_density, _ = target.log_density(1.0)
    move = Move("mala")
    g = torch.Generator().manual_seed(0)
    theta = 0.1 * torch.randn(num_particles, model.layout.dim, generator=g)
    lp, grad = log_density(theta)
    scale = torch.ones(model.layout.dim)
    move.kernel(g, theta, lp, grad, log_density, 1e-3, scale)     # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        move.kernel(g, theta, lp, grad, log_density, 1e-3, scale)
    return (time.perf_counter() - t0) / repeats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--hidden", type=int, default=50)
    ap.add_argument("--particles", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--mcmc-steps", type=int, default=5)
    ap.add_argument("--move", default="mala")
    ap.add_argument("--ess-threshold", type=float, default=0.5)
    ap.add_argument("--prior-scale", type=float, default=0.5)
    ap.add_argument("--schedules", default="full,adaptive,linear")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 gives stable timings on a shared box)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.hidden, args.particles = 16, 32
    ds = load(args.dataset)
    print(f"{ds}; MLP hidden={args.hidden}, particles={args.particles}, batch={args.batch_size}, "
          f"move={args.move} x{args.mcmc_steps}, ess_threshold={args.ess_threshold}, threads={args.threads}")
    rows = {}
    for schedule in args.schedules.split(","):
        torch.manual_seed(args.seed)
        model = BayesianNet(mlp(ds.num_features, ds.num_outputs, (args.hidden,)), ds.likelihood,
                            prior_scale=args.prior_scale)
        smc = AnnealedSMC(model, num_particles=args.particles, batch_size=args.batch_size, schedule=schedule,
                          ess_threshold=args.ess_threshold, move=args.move, num_mcmc_steps=args.mcmc_steps,
                          seed=args.seed, progress=args.progress)
        t0 = time.perf_counter()
        smc.run(ds.x_train, ds.y_train)
        seconds = time.perf_counter() - t0
        probs = predict(model, smc.particles()[0], ds.x_test)
        d = smc.diagnostics()
        rows[schedule] = dict(time_s=seconds, steps=d["num_steps"]["chain 0"], grad_passes=d["grad_evals"]["chain 0"],
                              example_grads=d["data_grad_evals"]["chain 0"],
                              accuracy=metrics.accuracy(probs, ds.y_test), nll=metrics.nll(probs, ds.y_test),
                              ece=metrics.ece(probs, ds.y_test), log_evidence=float(smc.log_evidence[0]),
                              mean_accept=sum(d["acceptance_rate"]["chain 0"]) / d["num_steps"]["chain 0"])
        print(schedule, {k: round(v, 4) if isinstance(v, float) else v for k, v in rows[schedule].items()}, flush=True)

    print()
    keys = ["time_s", "steps", "grad_passes", "example_grads", "accuracy", "nll", "ece", "log_evidence", "mean_accept"]
    print(f"{'schedule':<10}" + "".join(f"{k:>14}" for k in keys))
    for name, r in rows.items():
        print(f"{name:<10}" + "".join(f"{r[k]:>14.4g}" for k in keys))
    if "full" in rows:
        base = rows["full"]
        for name, r in rows.items():
            if name == "full":
                continue
            speed = base["time_s"] / r["time_s"]
            work = base["example_grads"] / r["example_grads"]
            dacc = 100 * (r["accuracy"] - base["accuracy"])
            dnll = 100 * (r["nll"] / base["nll"] - 1)
            ok = speed >= 4 and abs(dacc) <= 1 and dnll <= 5
            print(f"{name} vs full: {speed:.2f}x faster (wall), {work:.2f}x fewer example-gradients, "
                  f"accuracy {dacc:+.2f} points, NLL {dnll:+.1f}% -> target (>=4x, |dacc|<=1, dNLL<=5%) "
                  f"{'MET' if ok else 'NOT MET'}")

    model = BayesianNet(mlp(ds.num_features, ds.num_outputs, (args.hidden,)), ds.likelihood)
    t1 = time_move(model, ds.x_train, ds.y_train, 1)
    t128 = time_move(model, ds.x_train, ds.y_train, 128)
    print(f"move step on all {ds.x_train.shape[0]} examples: 1 particle {1e3 * t1:.1f} ms, 128 particles "
          f"{1e3 * t128:.1f} ms -> ratio {t128 / t1:.1f}x (target < 10x) {'MET' if t128 / t1 < 10 else 'NOT MET'}")


if __name__ == "__main__":
    main()
