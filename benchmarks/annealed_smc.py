"""Data-annealed SMC against full-batch tempered SMC on a BNN classifier, in one run.

Runs :class:`~pyro_subnet.infer.AnnealedSMC` with ``schedule="full"`` (adaptive likelihood
tempering on all data: the baseline), ``"adaptive"`` (one batch per stage), ``"adaptive-g2"``
(``batch_growth=2``: the data double from stage to stage) and ``"linear"`` (data annealing) on the
same MLP and data, and prints time, gradient passes, examples touched by gradients, test
accuracy, NLL, ECE and log evidence, with the ratios against ``"full"``. Then times one MALA move
step with 1 and with 128 particles (the vectorisation target: 128 particles < 10x one particle),
through the sampler's particle-batched log-likelihood and through the generic ``vmap`` path, on
all the training data and on one 64-example batch, next to the time of the bare matrix products
of the forward and backward pass (the arithmetic every implementation has to do).

Targets: a data-annealed schedule at least 4x faster than ``"full"`` in wall time, with test
accuracy within 1 point and NLL within 5% of it (Millard et al., 2026, report up to 6x at nearly
the same accuracy).

    python benchmarks/annealed_smc.py                  # digits, MLP 64-50-10, 128 particles
    python benchmarks/annealed_smc.py --quick          # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import time

import torch

from pyro_subnet import metrics
from pyro_subnet.data import load
from pyro_subnet.main_job import mlp
from pyro_subnet.infer import AnnealedSMC
from pyro_subnet.infer.smc import AnnealedTarget, DataPath, Move
from pyro_subnet.infer.smc.particle_likelihood import particle_log_lik
from pyro_subnet.nn import BayesianNet


def predict(model, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Posterior predictive class probabilities: the particle average of softmax outputs."""
    with torch.no_grad():
        return torch.softmax(model.network.flat_batched(theta, x), -1).mean(0)


def time_move(model, x, y, num_particles: int, repeats: int = 5, log_lik=None) -> float:
    """Seconds per MALA move step (one gradient pass on all of ``x``) for ``num_particles``,
    with ``log_lik`` (default: the sampler's particle-batched one)."""
    log_lik = particle_log_lik(model) if log_lik is None else log_lik
    path = DataPath(x.shape[0], None)
    target = AnnealedTarget(model.log_prior, lambda t, a, b: log_lik(t, x[a:b], y[a:b]), path)
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


def time_matmuls(model, x, num_particles: int, repeats: int = 5) -> float:
    """Seconds for the bare matrix products of one forward and backward pass of the MLP for
    ``num_particles`` (first layer one GEMM with the shared input, later layers batched), with
    no activation, likelihood or kernel: the arithmetic floor of a move step."""
    ws = [m.weight for m in model.network.module if isinstance(m, torch.nn.Linear)]
    p, n = num_particles, x.shape[0]
    w1 = torch.randn(p * ws[0].shape[0], ws[0].shape[1])
    rest = [torch.randn(p, w.shape[0], w.shape[1]) for w in ws[1:]]

    def once():
        h = w1 @ x.t()                                            # (P H, n)
        hs = [h.view(p, -1, n)]
        for w in rest:
            hs.append(torch.bmm(w, hs[-1]))
        g = torch.ones_like(hs[-1])
        for w, h in zip(reversed(rest), reversed(hs[:-1])):
            torch.bmm(g, h.transpose(1, 2))                       # weight gradient
            g = torch.bmm(w.transpose(1, 2), g)                   # input gradient
        g.reshape(p * g.shape[1], n) @ x                           # first-layer weight gradient
    once()
    t0 = time.perf_counter()
    for _ in range(repeats):
        once()
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
    ap.add_argument("--schedules", default="full,adaptive,adaptive-g2,linear",
                    help="comma-separated; 'adaptive-gX' is adaptive with batch_growth=X")
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
    for name in args.schedules.split(","):
        schedule, _, growth = name.partition("-g")
        torch.manual_seed(args.seed)
        model = BayesianNet(mlp(ds.num_features, ds.num_outputs, (args.hidden,)), ds.likelihood,
                            prior_scale=args.prior_scale)
        smc = AnnealedSMC(model, num_particles=args.particles, batch_size=args.batch_size, schedule=schedule,
                          ess_threshold=args.ess_threshold, move=args.move, num_mcmc_steps=args.mcmc_steps,
                          batch_growth=float(growth or 1), seed=args.seed, progress=args.progress)
        t0 = time.perf_counter()
        smc.run(ds.x_train, ds.y_train)
        seconds = time.perf_counter() - t0
        probs = predict(model, smc.particles()[0], ds.x_test)
        d = smc.diagnostics()
        rows[name] = dict(time_s=seconds, steps=d["num_steps"]["chain 0"], grad_passes=d["grad_evals"]["chain 0"],
                              example_grads=d["data_grad_evals"]["chain 0"],
                              accuracy=metrics.accuracy(probs, ds.y_test), nll=metrics.nll(probs, ds.y_test),
                              ece=metrics.ece(probs, ds.y_test), log_evidence=float(smc.log_evidence[0]),
                              mean_accept=sum(d["acceptance_rate"]["chain 0"]) / d["num_steps"]["chain 0"])
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in rows[name].items()}, flush=True)
        print(f"  examples per SMC step: {d['num_data']['chain 0']}", flush=True)

    print()
    keys = ["time_s", "steps", "grad_passes", "example_grads", "accuracy", "nll", "ece", "log_evidence", "mean_accept"]
    print(f"{'schedule':<12}" + "".join(f"{k:>14}" for k in keys))
    for name, r in rows.items():
        print(f"{name:<12}" + "".join(f"{r[k]:>14.4g}" for k in keys))
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
    print()
    for n in (ds.x_train.shape[0], args.batch_size):
        x, y = ds.x_train[:n], ds.y_train[:n]
        for path, log_lik in (("batched", None), ("vmap", model.log_likelihood)):
            t1 = time_move(model, x, y, 1, repeats=20, log_lik=log_lik)
            t128 = time_move(model, x, y, 128, log_lik=log_lik)
            print(f"move step, {path:>7} path, {n:>5} examples: 1 particle {1e3 * t1:7.2f} ms, 128 particles "
                  f"{1e3 * t128:7.2f} ms -> ratio {t128 / t1:5.1f}x (target < 10x) "
                  f"{'MET' if t128 / t1 < 10 else 'NOT MET'}", flush=True)
        m1, m128 = time_matmuls(model, x, 1, 20), time_matmuls(model, x, 128)
        print(f"bare matmuls of forward+backward, {n:>5} examples: 1 particle {1e3 * m1:7.2f} ms, 128 particles "
              f"{1e3 * m128:7.2f} ms -> ratio {m128 / m1:5.1f}x (the arithmetic alone)", flush=True)


if __name__ == "__main__":
    main()
