"""Every method on the four UCI regression sets, beside the published MC-dropout and deep-ensemble numbers.

Protocol of Hernandez-Lobato & Adams (2015) and Gal & Ghahramani (2016): the 20 fixed train/test
splits shipped inside the package (``pyro_subnet/data/uci_splits/``); one hidden layer of 50 ReLU units; inputs and targets
standardised with the training split's statistics; test log-likelihood per point and RMSE in the
*original* target units, :math:`\\log p(y) = \\log \\mathcal{N}(y; s\\mu + m, s^2\\sigma^2)` for a
prediction :math:`\\mathcal{N}(\\mu, \\sigma^2)` in standardised units (``m, s`` the training
targets' mean and standard deviation), i.e. the standardised log-density minus :math:`\\log s`;
mean and standard error over splits.

The observation noise is learned, not fixed (``BayesianNet(noise_scale=None)``): jointly with the
weights for the MAP; by the Laplace evidence, jointly with the prior precision, for the Laplace
guides and the analytic predictive; by Monte-Carlo EM during warm-up for SGHMC and
SpikeSlabSGHMC; as a latent per particle for AnnealedSMC. Every method starts from the same MAP
(:class:`~pyro_subnet.main_job.Context`, the main job's pieces); the SG-MCMC chains after the
first start from MAP fits of their own (:meth:`~pyro_subnet.main_job.Context.map_members`).

Usage::

    python benchmarks/uci.py                                   # all sets, 20 splits, all methods
    python benchmarks/uci.py --datasets boston concrete --splits 5 --methods map,subnet_laplace
    python benchmarks/uci.py --quick --splits 1                # small settings (the test uses them)

Per-split results are appended to ``--json`` (one JSON object a line) so a long run can be
resumed with ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:       # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from pyro.infer import Predictive  # noqa: E402

from pyro_subnet import metrics  # noqa: E402
from pyro_subnet.data.uci import UCI_FOLDERS, hidden_units, load_uci, num_splits, readme  # noqa: E402
from pyro_subnet.main_job import METHODS, Context, mlp  # noqa: E402
from pyro_subnet.nn import BayesianNet  # noqa: E402

DATASETS = ("boston", "concrete", "energy", "yacht")
DISPLAY = {"map": "MAP", "subnet_laplace": "AutoSubnetLaplace", "sampled_laplace": "AutoSampledLaplace",
           "sghmc": "SGHMC", "spike_slab_sghmc": "SpikeSlabSGHMC", "annealed_smc": "AnnealedSMC",
           "analytic": "AnalyticPredictive"}
DEFAULT_METHODS = tuple(DISPLAY)
#: Methods whose guide also goes through ``pyro.infer.Predictive`` (the route the README shows),
#: reported as their own rows so the two routes can be compared.
PREDICTIVE_ROUTE = {"subnet_laplace": "subnet_laplace_predictive", "sampled_laplace": "sampled_laplace_predictive"}
DISPLAY.update({"subnet_laplace_predictive": "  via Predictive", "sampled_laplace_predictive": "  via Predictive"})
PREDICTIVE_DRAWS = 2000


# The MALA moves the recorded UCI runs used; the sampler's defaults (256 particles, HMC) took
# about 24 minutes on one Boston split on the 2-core machine (docs/measured.md).
SMC_MALA = {"move": "mala", "batch_growth": 2.0, "max_mcmc_steps": 15}


def settings(quick: bool, num_train: int) -> Dict[str, object]:
    """The per-method settings of the benchmark (``quick``: the test's small ones)."""
    if quick:
        return dict(map_steps=300, options={
            "subnet_laplace": {"k": 100},
            "sampled_laplace": {"num_posterior_samples": 8, "num_em_steps": 2, "max_iter": 30},
            "sghmc": {"num_samples": 20, "warmup_steps": 30, "steps_per_sample": 5},
            "spike_slab_sghmc": {"num_samples": 20, "warmup_steps": 30, "steps_per_sample": 5},
            "annealed_smc": {"num_particles": 16, "batch_size": max(64, num_train // 4), "num_mcmc_steps": 2,
                             **SMC_MALA},
        })
    # The main job's chain length and preconditioner (RMSprop), and four chains, each from its own
    # MAP: on Boston and concrete (splits 0-5, docs/measured.md) each raised SGHMC's test LL.
    sgmcmc = {"num_samples": 300, "warmup_steps": 600, "steps_per_sample": 10, "preconditioner": "rmsprop",
              "num_chains": 4}
    return dict(map_steps=2000, options={
        "subnet_laplace": {"k": 10 ** 9},          # all weights: the network is small
        "sampled_laplace": {"num_posterior_samples": 32, "num_em_steps": 5, "max_iter": 100},
        "sghmc": sgmcmc,
        # pruned to half the weight matrices: the sparsity at which its RMSE is compared with
        # dense SGHMC's (uci_spike_slab.txt)
        "spike_slab_sghmc": {**sgmcmc, "target_sparsity": 0.5},
        "annealed_smc": {"num_particles": 64, "batch_size": 64, "num_mcmc_steps": 5, **SMC_MALA},
    })


PUBLISHED = {"mc_dropout": "MC dropout", "deep_ensemble": "deep ensemble"}


def published() -> Dict[str, Dict[str, Dict[str, tuple]]]:
    """The published rows of the packaged data's README: name -> {"mc_dropout": {"ll": (mean, se),
    "rmse": (mean, se)}, "deep_ensemble": {...}}."""
    names = {"Boston housing": "boston", "Concrete": "concrete", "Energy": "energy", "Yacht": "yacht"}
    out = {}
    for line in readme().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in names:
            nums = [tuple(float(v) for v in re.findall(r"-?\d+\.\d+", c)) for c in cells[2:]]
            out[names[cells[0]]] = {"mc_dropout": {"ll": nums[0], "rmse": nums[1]},
                                    "deep_ensemble": {"ll": nums[2], "rmse": nums[3]}}
    return out


def original_units(ds, mean: torch.Tensor, var: torch.Tensor):
    """Predictive mean, variance and test targets mapped back to the original units."""
    return (mean * ds.y_std + ds.y_mean, var * ds.y_std ** 2, ds.y_test * ds.y_std + ds.y_mean)


def test_scores(ds, mean: torch.Tensor, var: torch.Tensor) -> Dict[str, float]:
    """Test log-likelihood per point and RMSE in the original units."""
    m, v, y = original_units(ds, mean, var)
    return {"ll": -metrics.nll(m, y, var=v), "rmse": metrics.rmse(m, y)}


def predictive_scores(ds, model, guide, num_samples: int = PREDICTIVE_DRAWS) -> Dict[str, float]:
    """Test LL and RMSE of ``pyro.infer.Predictive(model, guide=guide)``: the observed site's draws
    at the test inputs, as a Gaussian with their mean and variance (the GLM predictive of a Laplace
    guide is Gaussian, so this is the same predictive up to Monte Carlo error)."""
    with torch.no_grad():
        draws = Predictive(model, guide=guide, num_samples=num_samples, parallel=True)(ds.x_test)["obs"]
    draws = draws.reshape(num_samples, -1)
    return test_scores(ds, draws.mean(0), draws.var(0))


def make_model(ds, seed: int) -> BayesianNet:
    """One hidden layer of 50 (the folder's ``n_hidden``) ReLU units, noise learned."""
    torch.manual_seed(seed)
    name = ds.name.split("_")[1]
    net = mlp(ds.num_features, 1, (hidden_units(name),), activation=nn.ReLU)
    return BayesianNet(net, likelihood="regression", prior_scale=1.0, noise_scale=None)


def run_split(name: str, split: int, methods: Sequence[str], quick: bool = False, seed: int = 0,
              progress: bool = False, map_prior: str = "fixed") -> Dict[str, Dict[str, float]]:
    """Every method on one split; returns method -> {"ll", "rmse", "time_s", diagnostics...}."""
    ds = load_uci(name, split)
    cfg = settings(quick, len(ds.x_train))
    ctx = Context(ds, make_model(ds, seed), quick=quick, seed=seed, progress=progress, diagnostics=False,
                  map_steps=cfg["map_steps"], options=cfg["options"], map_prior=map_prior)
    ctx.theta_map                            # the shared MAP (and its noise), timed once
    out = {}
    for m in methods:
        torch.manual_seed(seed)
        r = METHODS[m](ctx)
        out[m] = {**test_scores(ds, r.mean, r.var), "time_s": r.seconds,
                  **{k: float(v) for k, v in r.diagnostics.items() if isinstance(v, (int, float))}}
        if m in PREDICTIVE_ROUTE:
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            out[PREDICTIVE_ROUTE[m]] = {**predictive_scores(ds, ctx.model, r.guide),
                                        "time_s": r.seconds + time.perf_counter() - t0}
    return out


def mean_se(values: Sequence[float]):
    a = np.asarray(values, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan"))


def _pm(ms, digits=2) -> str:
    m, se = ms
    if abs(m) >= 1000:          # a diverged run: keep the column readable
        return f"{m:.3g} ± {se:.2g}" if math.isfinite(se) else f"{m:.3g}"
    return f"{m:.{digits}f} ± {se:.{digits}f}" if math.isfinite(se) else f"{m:.{digits}f}"


def format_table(records: List[dict], methods: Sequence[str], datasets: Sequence[str]) -> str:
    """One block per data set: every method's test LL and RMSE (mean ± s.e. over splits), time,
    and the published MC-dropout and deep-ensemble rows; the best LL compared with MC dropout."""
    ref = published()
    lines = []
    for d in datasets:
        recs = [r for r in records if r["dataset"] == d]
        if not recs:
            continue
        n = len({r["split"] for r in recs})
        lines.append(f"{d} ({n} split{'s' if n != 1 else ''})")
        head = f"  {'method':<20}{'test LL':>18} {'test RMSE':>18}{'time/split s':>14}"
        lines += [head, "  " + "-" * (len(head) - 2)]
        best, best_ll = None, -float("inf")
        for m in [row for m in methods for row in (m, PREDICTIVE_ROUTE.get(m)) if row]:
            rows = [r["methods"][m] for r in recs if m in r["methods"]]
            if not rows:
                continue
            ll, rmse = mean_se([x["ll"] for x in rows]), mean_se([x["rmse"] for x in rows])
            t = float(np.mean([x["time_s"] for x in rows]))
            lines.append(f"  {DISPLAY[m]:<20}{_pm(ll):>18} {_pm(rmse):>18}{t:>14.1f}")
            if ll[0] > best_ll:
                best, best_ll = m, ll[0]
        pairs = [(r["methods"]["spike_slab_sghmc"]["rmse"], r["methods"]["sghmc"]["rmse"]) for r in recs
                 if {"sghmc", "spike_slab_sghmc"} <= set(r["methods"])]
        if pairs:
            ratios = [a / b for a, b in pairs]
            sparsity = np.mean([r["methods"]["spike_slab_sghmc"].get("sparsity", float("nan")) for r in recs
                                if "spike_slab_sghmc" in r["methods"]])
            lines.append(f"  SpikeSlabSGHMC at sparsity {sparsity:.2f}: RMSE {np.mean(ratios):.2f}x dense SGHMC's "
                         f"(per split {min(ratios):.2f}-{max(ratios):.2f})")
        if d in ref:
            for key, label in PUBLISHED.items():
                row = ref[d][key]
                lines.append(f"  {label + ' (publ.)':<20}{_pm(row['ll']):>18} {_pm(row['rmse']):>18}")
            mc = ref[d]["mc_dropout"]["ll"][0]
            verdict = "beats" if best_ll > mc else "does NOT beat"
            parent = {v: k for k, v in PREDICTIVE_ROUTE.items()}.get(best)
            label = f"{DISPLAY[parent]} via Predictive" if parent else DISPLAY[best]
            lines.append(f"  best: {label} {best_ll:.2f} {verdict} MC dropout {mc:.2f} (test LL)")
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=sorted(UCI_FOLDERS))
    p.add_argument("--splits", type=int, default=20, help="first K of the 20 standard splits (default 20)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {','.join(DEFAULT_METHODS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="small settings (a smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="append per-split results here (JSON lines); with "
                   "--resume, a comma-separated list of such files is read (new results go to the first)")
    p.add_argument("--resume", action="store_true", help="skip splits already in the --json files")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument("--map-prior", choices=("fixed", "evidence"), default="fixed",
                   help="the shared MAP's prior: the fixed Normal(0, 1) (default) or its scale chosen by the "
                   "evidence framework (fit_map_by_evidence), which every method then uses")
    p.add_argument("--progress", action="store_true")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in DEFAULT_METHODS]
    if unknown or not methods:
        print(f"uci.py: unknown method(s) {unknown}; choose from {', '.join(DEFAULT_METHODS)}", file=sys.stderr)
        return 2
    records = []
    if args.json and args.resume:
        for path in args.json.split(","):
            if Path(path).exists():
                records += [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("map_prior", "fixed") == args.map_prior]
    done = {(r["dataset"], r["split"]) for r in records}
    # Split-major order: a run stopped early has the same splits for every data set.
    for k in range(args.splits):
        for d in args.datasets:
            if k >= num_splits(d) or (d, k) in done:
                continue
            t0 = time.perf_counter()
            rec = {"dataset": d, "split": k, "quick": args.quick, "map_prior": args.map_prior,
                   "methods": run_split(d, k, methods, args.quick, args.seed, args.progress, args.map_prior)}
            records.append(rec)
            summary = " ".join(f"{m}={v['ll']:.2f}" for m, v in rec["methods"].items())
            print(f"[{d} split {k}: {time.perf_counter() - t0:.0f}s] LL {summary}", flush=True)
            if args.json:
                with open(args.json.split(",")[0], "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
    records = [r for r in records if r["dataset"] in args.datasets and r["split"] < args.splits]
    table = f"# MAP prior: {args.map_prior}\n" + format_table(records, methods, args.datasets)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
