"""The ``pyro-subnet`` command: fit every method on an embedded data set and print one table."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from .data import LOADERS, load
from .experiment import METHODS, make_context


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pyro-subnet",
        description="Fit Bayesian neural networks with every pyro_subnet method on an embedded data "
                    "set and print test accuracy, NLL, ECE, Brier score and time side by side.",
    )
    p.add_argument("--dataset", default="digits", choices=sorted(LOADERS),
                   help="embedded data set (default: digits)")
    p.add_argument("--methods", default="all",
                   help=f"comma-separated methods from {{{','.join(METHODS)}}}, or 'all' (default)")
    p.add_argument("--quick", action="store_true", help="small network and short runs (a smoke test)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _parse_methods(spec: str) -> List[str]:
    if spec == "all":
        return list(METHODS)
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown or spec!r}; choose from {', '.join(METHODS)} or 'all'")
    return names


def format_table(rows, likelihood: str) -> str:
    cols = (["accuracy", "nll", "ece", "brier", "time_s"] if likelihood == "classification"
            else ["rmse", "nll", "time_s"])
    head = f"{'method':<22}" + "".join(f"{c:>10}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, scores in rows:
        lines.append(f"{name:<22}" + "".join(f"{scores[c]:>10.4f}" for c in cols))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        methods = _parse_methods(args.methods)
        torch.manual_seed(args.seed)
        ds = load(args.dataset, seed=args.seed)
        ctx = make_context(ds, quick=args.quick, seed=args.seed, progress=not args.no_progress)
        print(f"{ds}; network {ctx.model.layout.dim} weights", flush=True)
        rows = []
        for name in methods:
            result = METHODS[name](ctx)
            rows.append((result.name, result.scores(ds)))
        print(format_table(rows, ds.likelihood))
    except ValueError as e:
        print(f"pyro-subnet: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
