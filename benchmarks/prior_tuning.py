"""How the Laplace guides' prior precision is chosen, and what each choice costs in distribution and
buys under shift, on the main job's digits network (64-100-100-10 tanh, the main job's MAP).

For each seed (the data split and the 10% validation split change with it), every rule fits the same
guide from the same MAP:

* ``evidence``: ``prior_precision="marglik"`` (AutoSubnetLaplace) / ``"em"`` (AutoSampledLaplace);
* ``validation``: the grid search on the held-out split, argmin (the default rule);
* ``validation tol=t``: the broadest posterior within ``t`` (relative) of the best held-out NLL.

It prints, per rule, the chosen precision and the test NLL in distribution and at 30 degrees of
rotation as ratios to the MAP's, and the OOD AUROC (inverted digits), then each rule's median and
how many seeds meet the main job's targets (in distribution <= 1.05x MAP, rotated <= 0.8x MAP).

Usage::

    python benchmarks/prior_tuning.py                     # 5 seeds, both guides
    python benchmarks/prior_tuning.py --seeds 0 1 --guides subnet
"""

from __future__ import annotations

import argparse
import statistics

import torch

from pyro_subnet import metrics
from pyro_subnet.data import load
from pyro_subnet.data.shift import ood_inputs, shifted_inputs
from pyro_subnet.main_job import make_context
from pyro_subnet.infer import AutoSampledLaplace, AutoSubnetLaplace
from pyro_subnet.subnet import PredictiveVariance

TOLERANCES = (0.05, 0.2)


def make_guide(kind, model, spec, tol, seed):
    if kind == "subnet":
        # A seeded selection, so every rule of a seed works on the same subnetwork.
        return AutoSubnetLaplace(model, subnet=PredictiveVariance(1000, seed=seed), prior_precision=spec,
                                 validation_tolerance=tol, progress=False)
    return AutoSampledLaplace(model, num_posterior_samples=32, prior_precision=spec, num_em_steps=5, em_tol=1e-2,
                              tol=1e-3, max_iter=200, seed=0, validation_tolerance=tol, progress=False)


def scores(predict, ds, shifted, ood):
    p_in = predict(ds.x_test)
    p_rot = predict(shifted["rotate_30"])
    p_ood = predict(ood["inverted"])
    auroc = metrics.auroc(metrics.entropy(p_in), metrics.entropy(p_ood))
    return metrics.nll(p_in, ds.y_test), metrics.nll(p_rot, ds.y_test), auroc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--guides", nargs="+", choices=("subnet", "sampled"), default=["subnet", "sampled"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = {}
    for seed in args.seeds:
        ds = load("digits", seed=seed)
        ctx = make_context(ds, seed=seed, progress=False)
        theta = ctx.theta_map
        shifted, ood = shifted_inputs(ctx.ds), ood_inputs(ctx.ds)
        for kind in args.guides:
            rules = [("evidence", "marglik" if kind == "subnet" else "em", 0.0), ("validation", "validation", 0.0)]
            rules += [(f"validation tol={t}", "validation", t) for t in TOLERANCES]
            # The MAP's own predictive: the same guide with a prior so tight its posterior is a point.
            base = make_guide(kind, ctx.model, 1e8, 0.0, seed).fit(ctx.ds.x_train, ctx.ds.y_train, map_theta=theta)
            map_in, map_rot, map_auc = scores(base.predict, ctx.ds, shifted, ood)
            print(f"seed {seed} {kind}: MAP nll {map_in:.4f}, rotated {map_rot:.3f}, AUROC {map_auc:.3f}", flush=True)
            for name, spec, tol in rules:
                guide = make_guide(kind, ctx.model, spec, tol, seed).fit(ctx.ds.x_train, ctx.ds.y_train, map_theta=theta,
                                                                   validation=ctx.validation)
                nll_in, nll_rot, auc = scores(guide.predict, ctx.ds, shifted, ood)
                r = (nll_in / map_in, nll_rot / map_rot, auc - map_auc)
                rows.setdefault((kind, name), []).append(r)
                print(f"  {name:20s} p={float(guide.prior_prec.mean()):9.3g}  in {r[0]:.3f}x  rotated {r[1]:.3f}x  "
                      f"AUROC {auc:.3f} ({r[2]:+.3f})", flush=True)
    print("\nrule                              median in   median rotated   seeds in<=1.05x   seeds rotated<=0.8x")
    for (kind, name), rs in rows.items():
        ins, rots = [r[0] for r in rs], [r[1] for r in rs]
        print(f"{kind:8s} {name:24s} {statistics.median(ins):9.3f}x {statistics.median(rots):12.3f}x "
              f"{sum(i <= 1.05 for i in ins):10d}/{len(rs)} {sum(r <= 0.8 for r in rots):14d}/{len(rs)}")


if __name__ == "__main__":
    main()
