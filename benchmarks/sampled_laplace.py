"""AutoSampledLaplace over every weight of a >100k-weight digits MLP, beside MAP, diagonal Laplace
and AutoSubnetLaplace (k=1000), in one run; and its memory at two network sizes.

Part 1 (digits, MLP 64-300-300-10 tanh, 112,810 weights): one MAP network shared by every method.

- MAP: the network alone.
- AutoDiagonalLaplace: :math:`\\Sigma = \\mathrm{diag}(1/(\\mathrm{diag}\\,G + a))` over all weights at
  the model's prior (:math:`a = 1`); its GLM predictive reads each example's output covariance
  :math:`J \\Sigma J^\\top` from a Jacobian over all weights, so it runs in batches of 64 examples
  (``O(B O D)`` memory).
- AutoSubnetLaplace, k=1000: full covariance over the weights of largest SWAG variance (the paper),
  prior precision by the Laplace evidence.
- AutoSampledLaplace: all weights, 64 samples by sample-then-optimise (batched CG), prior
  precision by EM on the samples.

Every row but the MAP predicts by its guide's GLM predictive with the default link (Gumbel-max,
from the covariance between the logits).

For each: fit time (MAP excluded, it is shared), peak extra memory of the fit, test NLL,
accuracy and ECE (the in-table memory of later rows under-reads: pages an earlier row freed stay
resident; Part 2's fresh processes are the reliable memory numbers). Times and NLLs are printed as ratios to MAP / to diagonal Laplace measured in
the same run.

Part 2 (memory is linear in the number of weights): the peak resident memory that a fit of
AutoSampledLaplace adds, measured in a fresh process (Linux ``VmHWM`` after ``clear_refs``) for
two widths; the ratio of memory per weight at the two sizes should be near 1. A dense GGN over
all weights would need :math:`4 D^2` bytes, printed beside it.

Run: ``python benchmarks/sampled_laplace.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

import pyro_subnet as ps
from pyro_subnet.main_job import mlp
from pyro_subnet.infer import AutoDiagonalLaplace, AutoSampledLaplace, AutoSubnetLaplace


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (this measurement needs Linux)")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:   # "5" resets the peak resident set (VmHWM)
        fh.write("5")


def make_model(ds, width: int):
    torch.manual_seed(0)
    return ps.nn.BayesianNet(mlp(ds.num_features, ds.num_outputs, (width, width)), likelihood="classification",
                             prior_scale=1.0)


def sampled_guide(model, quick: bool):
    return AutoSampledLaplace(model, num_posterior_samples=64, prior_precision="em",
                              num_em_steps=3 if quick else 5, em_tol=1e-2, tol=1e-3,
                              max_iter=60 if quick else 150, map_steps=0, progress=False)


def memory_probe(width: int, quick: bool) -> dict:
    """Run in a fresh process: the peak memory a fit adds over the model, data and MAP weights."""
    torch.set_num_threads(1)
    ds = ps.data.load_digits()
    model = make_model(ds, width)
    theta = model.initial_theta()
    guide = sampled_guide(model, quick)
    guide.max_iter = 20            # memory does not depend on the number of iterations
    guide.num_em_steps = 1
    _, _, peak_mib = peak_of(lambda: guide.fit(ds.x_train, ds.y_train, map_theta=theta))
    return {"width": width, "weights": model.layout.dim, "peak_extra_mib": peak_mib}


def scores(probs, y):
    return {"nll": ps.metrics.nll(probs, y), "acc": ps.metrics.accuracy(probs, y), "ece": ps.metrics.ece(probs, y)}


def peak_of(fn):
    """Run ``fn`` and return ``(result, seconds, peak extra MiB)`` in this process."""
    _reset_peak()
    base = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, (_rss_kib("VmHWM") - base) / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter MAP, looser solves, smaller nets")
    p.add_argument("--probe", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe is not None:
        print(json.dumps(memory_probe(args.probe, args.quick)))
        return
    torch.set_num_threads(1)
    ds = ps.data.load_digits()
    width = 150 if args.quick else 300
    model = make_model(ds, width)
    D = model.layout.dim
    print(f"digits, MLP 64-{width}-{width}-10 tanh, {D:,} weights, {len(ds.x_train)} training examples")
    t0 = time.perf_counter()
    theta = ps.infer.fit_map(model, ds.x_train, ds.y_train, num_steps=600 if args.quick else 3000, lr=3e-3,
                             batch_size=128, progress=False).theta
    print(f"MAP fit {time.perf_counter() - t0:.1f}s")
    rows = {}
    with torch.no_grad():
        rows["MAP"] = (scores(torch.softmax(model.network.flat(theta, ds.x_test), -1), ds.y_test), 0.0, 0.0)

    def diag_laplace():
        guide = AutoDiagonalLaplace(model, batch_size=64, map_steps=0, progress=False)   # the model's prior
        return guide.fit(ds.x_train, ds.y_train, map_theta=theta).predict(ds.x_test)
    probs, secs, mem = peak_of(diag_laplace)
    rows["diag Laplace (all, prior 1)"] = (scores(probs, ds.y_test), secs, mem)

    def subnet():
        guide = AutoSubnetLaplace(model, subnet=ps.subnet.LargestVariance(1000, method="swag"),
                                  prior_precision="marglik", map_steps=0, progress=False)
        return guide.fit(ds.x_train, ds.y_train, map_theta=theta).predict(ds.x_test)
    probs, secs, mem = peak_of(subnet)
    rows["AutoSubnetLaplace k=1000"] = (scores(probs, ds.y_test), secs, mem)

    guide = sampled_guide(model, args.quick)
    probs, secs, mem = peak_of(lambda: guide.fit(ds.x_train, ds.y_train, map_theta=theta).predict(ds.x_test))
    rows["AutoSampledLaplace (all)"] = (scores(probs, ds.y_test), secs, mem)
    tr = guide.em_trace
    print(f"AutoSampledLaplace EM: prior precision {float(tr[0, 0]):.3g} -> {float(guide.prior_prec[0]):.3g} "
          f"in {len(tr)} steps, effective dim {float(tr[-1, 1]):.0f} of {D}, CG iterations per solve "
          f"{[int(i) for i in tr[:, 2]]}, final residual {float(tr[-1, 3]):.1e}")

    ref_time = rows["diag Laplace (all, prior 1)"][1]
    map_nll = rows["MAP"][0]["nll"]
    print(f"\n{'method':26s} {'NLL':>7s} {'NLL/MAP':>8s} {'acc':>6s} {'ECE':>6s} {'fit s':>7s} "
          f"{'time/diag':>9s} {'peak MiB':>9s}")
    for name, (s, secs, mem) in rows.items():
        print(f"{name:26s} {s['nll']:7.4f} {s['nll'] / map_nll:8.3f} {s['acc']:6.3f} {s['ece']:6.3f} "
              f"{secs:7.1f} {secs / ref_time if secs else 0:9.1f} {mem:9.0f}")

    widths = (75, 150) if args.quick else (150, 300)
    probes = []
    for w in widths:
        cmd = [sys.executable, __file__, "--probe", str(w)] + (["--quick"] if args.quick else [])
        probes.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    print("\nmemory of an AutoSampledLaplace fit (64 samples, fresh process each)")
    for r in probes:
        print(f"  width {r['width']:4d}: {r['weights']:8,d} weights, peak extra {r['peak_extra_mib']:7.1f} MiB "
              f"({r['peak_extra_mib'] * 2 ** 20 / r['weights']:7.0f} B/weight; a dense GGN would be "
              f"{4 * r['weights'] ** 2 / 2 ** 20:9,.0f} MiB)")
    a, b = probes
    per_w = (b["peak_extra_mib"] / b["weights"]) / (a["peak_extra_mib"] / a["weights"])
    print(f"  weights x{b['weights'] / a['weights']:.2f}, memory x{b['peak_extra_mib'] / a['peak_extra_mib']:.2f}: "
          f"memory per weight ratio {per_w:.2f} (1 = linear, {b['weights'] / a['weights']:.1f} = quadratic)")


if __name__ == "__main__":
    main()
