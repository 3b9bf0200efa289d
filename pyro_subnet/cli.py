"""The ``pyro-subnet`` command: fit every method on an embedded data set and print one table."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import List, Optional

import matplotlib
import torch

from .data import LOADERS, load
from .diagnostics import plots
from .main_job import METHODS, make_context


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pyro-subnet",
        description="Fit Bayesian neural networks with every pyro_subnet method, and the deep-ensemble and "
                    "MC-dropout baselines, on an embedded data set; print test accuracy, NLL, ECE, Brier "
                    "score, NLL under shift, OOD-detection AUROC, time and each method's diagnostics side "
                    "by side; write them as JSON with figures.",
    )
    p.add_argument("--dataset", default="digits", choices=sorted(LOADERS),
                   help="embedded data set (default: digits)")
    p.add_argument("--methods", default="all",
                   help=f"comma-separated methods from {{{','.join(METHODS)}}}, or 'all' (default)")
    p.add_argument("--quick", action="store_true", help="small network and short runs (a smoke test)")
    p.add_argument("--out", default="pyro_subnet_out",
                   help="folder for results.json and the PNG figures (default: pyro_subnet_out)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; the main job's small networks run fastest on one "
                        "thread, and more threads than free cores slow them down many times over)")
    return p


def _parse_methods(spec: str) -> List[str]:
    if spec == "all":
        return list(METHODS)
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown or spec!r}; choose from {', '.join(METHODS)} or 'all'")
    return names


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _reference_shift(scores) -> str:
    """The shift the table shows: the middle level (``rotate_30`` for digits, ``noise_1`` else)."""
    names = list(scores["shift"])
    return "rotate_30" if "rotate_30" in names else names[len(names) // 2]


def format_table(rows, likelihood: str) -> str:
    """One line a method: the test scores, NLL under the reference shift, OOD AUROC and time, then
    the method's own diagnostics as ``key=value``."""
    cols = (["accuracy", "nll", "ece", "brier"] if likelihood == "classification" else ["rmse", "nll"])
    shift = _reference_shift(rows[0][1]) if rows else ""
    head = (f"{'method':<20}" + "".join(f"{c:>10}" for c in cols) + f"{'nll@' + shift:>18}{'ood_auroc':>11}"
            f"{'time_s':>9}  diagnostics")
    lines = [head, "-" * len(head)]
    nested = {"shift", "ood", "time_s"}
    for name, scores in rows:
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in scores.items() if k not in cols and k not in nested)
        lines.append(f"{name:<20}" + "".join(f"{scores[c]:>10.4f}" for c in cols)
                     + f"{scores['shift'][shift]['nll']:>18.4f}{scores['ood']['auroc']:>11.4f}"
                     + f"{scores['time_s']:>9.1f}  " + extra)
    return "\n".join(lines)


def _json_safe(v):
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _level(name: str) -> float:
    """``rotate_30`` -> 30.0, ``noise_0.5`` -> 0.5."""
    return float(name.rsplit("_", 1)[1])


def write_outputs(out: Path, ds, results, rows) -> List[Path]:
    """results.json and the figures; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    payload = {"dataset": ds.name, "likelihood": ds.likelihood, "num_train": len(ds.x_train),
               "num_test": len(ds.x_test), "shifts": list(rows[0][1]["shift"]) if rows else [],
               "methods": {name: _json_safe(scores) for name, scores in rows}}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    written.append(out / "results.json")
    if ds.likelihood == "classification":
        path = out / "reliability.png"
        plots.reliability_diagram({r.name: r.probs for r in results}, ds.y_test, path=path)
        written.append(path)
    elif ds.num_features == 1:
        for r in results:
            path = out / f"band_{r.name}.png"
            plots.predictive_band(ds.x_train, ds.y_train, ds.x_test, r.mean, r.var.sqrt(), title=r.name, path=path)
            written.append(path)
    if rows:
        curves = {name: {0.0: scores["nll"], **{_level(k): v["nll"] for k, v in scores["shift"].items()}}
                  for name, scores in rows}
        kind = "rotation (degrees)" if "rotate_30" in rows[0][1]["shift"] else "feature noise (sd)"
        path = out / "shift_nll.png"
        plots.shift_curve(curves, xlabel=kind, path=path)
        written.append(path)
    for r in results:
        if "smc" in r.plots:
            path = out / f"smc_{r.name}.png"
            plots.smc_traces(r.plots["smc"], path=path)
            written.append(path)
        if "inclusion" in r.plots:
            path = out / f"inclusion_{r.name}.png"
            plots.inclusion_histogram(r.plots["inclusion"], path=path)
            written.append(path)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    matplotlib.use("Agg")     # the figures are files: no display needed
    try:
        methods = _parse_methods(args.methods)
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        ds = load(args.dataset, seed=args.seed)
        ctx = make_context(ds, quick=args.quick, seed=args.seed, progress=not args.no_progress)
        print(f"{ds}; network {ctx.model.layout.dim} weights", flush=True)
        results, rows = [], []
        for name in methods:
            result = METHODS[name](ctx)
            results.append(result)
            rows.append((result.name, result.evaluate(ctx.ds)))
        print(format_table(rows, ds.likelihood))
        written = write_outputs(Path(args.out), ctx.ds, results, rows)
        print(f"wrote {', '.join(str(p) for p in written)}")
    except ValueError as e:
        print(f"pyro-subnet: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
