"""One process against N under ``torch.distributed`` (gloo on CPU, NCCL on GPU), in one run.

Launches itself twice with ``torchrun`` (``--nproc_per_node=1`` and ``=N``; run it directly, not
under torchrun) on the same problem and seed, then prints, for each method, the wall time of the
two runs, their ratio (the speed-up), and how far the N-process answer is from the 1-process one:

* ``map``: the data-parallel MAP (:func:`~pyro_subnet.infer.fit_map`, full batch);
* ``subnet_laplace``: AutoSubnetLaplace's GGN over a subnetwork (data-parallel, all-reduced),
  with the MAP weights given; difference of ``scale_tril`` and of the GLM predictive;
* ``sampled_laplace``: AutoSampledLaplace (sample-then-optimise by CG, data-parallel);
  difference of the samples;
* ``smc``: AnnealedSMC with particles sharded over the ranks; difference of the particles and
  of the log evidence (same seed: the run does not depend on the number of ranks);
* ``sghmc``: one SGHMC chain per rank; the time per chain, and the difference between
  rank 0's chain and the 1-process chain (same seed). N chains in about the time of one is the
  point here, so the ratio reported is chains per second (N-process / 1-process).

Every process uses one torch thread, so the ratios measure the ranks, not intra-op threading.
On a machine with fewer free cores than N the speed-up is bounded by the cores, not the method.

    python benchmarks/distributed.py                 # 2 processes, digits, MLP 64-50-10
    python benchmarks/distributed.py --nproc 4
    python benchmarks/distributed.py --quick         # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def worker(out_dir: str, quick: bool) -> None:
    """What each rank runs; rank 0 writes ``{method: {"time": s, tensors...}}``."""
    import pyro
    from pyro.infer import MCMC

    import pyro_subnet as ps
    from pyro_subnet.data import load
    from pyro_subnet.main_job import mlp
    from pyro_subnet.infer import distributed

    torch.set_num_threads(1)
    rank = distributed.init()
    ds = load("digits", dtype=torch.float64)
    x, y = ds.x_train, ds.y_train
    if quick:
        x, y = x[:300], y[:300]
    x_test = ds.x_test[:200]
    torch.manual_seed(0)
    model = ps.nn.BayesianNet(mlp(x.shape[1], 10, hidden=(50,)).double(), "classification")
    res = {}

    def barrier():
        if distributed.is_active():
            torch.distributed.barrier()

    barrier()
    t, fit = _timed(lambda: ps.infer.fit_map(model, x, y, num_steps=50 if quick else 300, lr=0.02,
                                             batch_size=None, progress=False))
    theta = fit.theta
    res["map"] = dict(time=t, theta=theta)

    barrier()
    guide = ps.infer.AutoSubnetLaplace(model, subnet=ps.subnet.LargestMagnitude(200 if quick else 600),
                                       prior_precision=1.0, batch_size=128, progress=False)
    t, _ = _timed(lambda: guide.fit(x, y, map_theta=theta))
    res["subnet_laplace"] = dict(time=t, scale_tril=guide.scale_tril, pred=guide.predict(x_test))

    barrier()
    guide = ps.infer.AutoSampledLaplace(model, num_posterior_samples=8 if quick else 16, prior_precision=1.0,
                                        max_iter=20 if quick else 60, tol=1e-8, batch_size=128, progress=False)
    t, _ = _timed(lambda: guide.fit(x, y, map_theta=theta))
    res["sampled_laplace"] = dict(time=t, samples=guide.samples)

    barrier()
    torch.manual_seed(1)
    small = ps.nn.BayesianNet(mlp(x.shape[1], 10, hidden=(16,)).double(), "classification")
    smc = ps.infer.AnnealedSMC(small, num_particles=64 if quick else 256, batch_size=100 if quick else 200,
                               schedule="adaptive", num_mcmc_steps=2, seed=3, progress=False)
    t, _ = _timed(lambda: smc.run(x, y))
    res["smc"] = dict(time=t, particles=smc.particles()[0], log_z=smc.log_evidence)

    barrier()
    pyro.set_rng_seed(10 + rank)
    torch.manual_seed(0)
    net = ps.nn.BayesianNet(mlp(x.shape[1], 10, hidden=(50,)).double(), "classification")
    mcmc = MCMC(ps.infer.SGHMC(net, step_size=1e-4, friction=0.5, subsample_size=64),
                num_samples=50 if quick else 200, warmup_steps=20 if quick else 100, disable_progbar=True)
    t, _ = _timed(lambda: mcmc.run(x, y))
    chains = distributed.gather_chains(mcmc)
    barrier()
    if rank == 0:
        w = chains.get_samples(group_by_chain=True)
        res["sghmc"] = dict(time=t, chain0=torch.cat([v[0].reshape(v.shape[1], -1) for v in w.values()], 1),
                            num_chains=chains.num_chains)
        torch.save(res, Path(out_dir) / f"world{distributed.world_size()}.pt")
    distributed.shutdown()


def launch(nproc: int, out_dir: str, quick: bool) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           __file__, "--worker", out_dir] + (["--quick"] if quick else [])
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"torchrun --nproc_per_node={nproc} failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        wall = {n: launch(n, tmp, args.quick) for n in (1, args.nproc)}
        one, many = torch.load(Path(tmp) / "world1.pt"), torch.load(Path(tmp) / f"world{args.nproc}.pt")
    n = args.nproc
    print(f"torch.distributed, 1 vs {n} processes (gloo, 1 thread each; {os.cpu_count()} CPUs), "
          f"{'quick' if args.quick else 'full'} sizes; launch wall time {wall[1]:.1f}s vs {wall[n]:.1f}s")
    print(f"{'method':<17}{'1 proc (s)':>11}{f'{n} procs (s)':>13}{'speed-up':>10}   max |difference| vs 1 process")
    checks = {
        "map": [("theta", diff(one["map"]["theta"], many["map"]["theta"]))],
        "subnet_laplace": [("scale_tril", diff(one["subnet_laplace"]["scale_tril"], many["subnet_laplace"]["scale_tril"])),
                           ("predictive", diff(one["subnet_laplace"]["pred"], many["subnet_laplace"]["pred"]))],
        "sampled_laplace": [("samples", diff(one["sampled_laplace"]["samples"], many["sampled_laplace"]["samples"]))],
        "smc": [("particles", diff(one["smc"]["particles"], many["smc"]["particles"])),
                ("log_evidence", diff(one["smc"]["log_z"], many["smc"]["log_z"]))],
        "sghmc": [("chain 0", diff(one["sghmc"]["chain0"], many["sghmc"]["chain0"]))],
    }
    for name, items in checks.items():
        t1, tn = one[name]["time"], many[name]["time"]
        speed = t1 / tn if name != "sghmc" else many[name]["num_chains"] * t1 / tn / one[name]["num_chains"]
        what = ", ".join(f"{k} {v:.1e}" for k, v in items)
        print(f"{name:<17}{t1:>11.2f}{tn:>13.2f}{speed:>9.2f}x   {what}")
    print("(sghmc speed-up: chains per second, N processes over 1; the others: time of 1 over time of N)")


if __name__ == "__main__":
    main()
