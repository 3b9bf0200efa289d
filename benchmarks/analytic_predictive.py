"""AnalyticPredictive against Monte Carlo Predictive, in one run, with the defaults a user gets.

Cases (digits; ``--steps`` of SVI for the AutoNormal guides):

* MLPs 64-100-10 and 64-100-100-10 (tanh) with an AutoNormal guide: the default against
  ``covariance="diag"`` and ``"full"`` and the paper's variant (linearised activations, probit
  link), timed against 100-sample ``Predictive`` sequential and vectorised (``parallel=True``);
  NLL against 1000-sample Monte Carlo. Targets: >= 20x sequential MC-100, >= 10x vectorised
  MC-100, NLL within 2% of MC-1000, the first call (a fresh predictor: construction and call)
  within 1.5x of later calls.
* The Laplace guides on the 64-50-10 MLP (AutoSubnetLaplace over 300 weights, AutoSampledLaplace
  over every weight): against Monte Carlo from the same posterior, i.e. ``Predictive`` through
  the guide (its GLM draws). Targets: NLL within 2% of MC-1000, >= 2x vectorised MC-100.
* A small transformer classifier on digits (rows of the 8x8 image as 8 tokens) with an AutoNormal
  guide: pre-norm, pre-norm with a final LayerNorm (the ViT and GPT-2 arrangement) and post-norm
  (the ``nn.TransformerEncoderLayer`` default); kept as measured (pre-norm: NLL within 2%, >= 20x).

The evidence for ``covariance="auto"`` is printed per case: the measured change
(``covariance_change``: on the probe rows, the mean KL divergence of the diagonal representation's
Gaussian utilities from the full one's, an upper bound of the change in the predictive), the
choice, and the NLL and time of both representations.

    python benchmarks/analytic_predictive.py [--steps 3000] [--seed 0] [--reference 10000] [--out FILE]
"""

import argparse
import os
import statistics
import time

import pyro
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

import pyro_subnet as ps


def _timed(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def _interleaved(fns, repeats, rounds=7):
    """Each round times every function in turn (the best of ``repeats[k]`` calls), so that all of them
    see the same state of a shared machine. Returns the outputs and, per function, the round bests."""
    outs, times = {}, {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            outs[k], t = _timed(fn, repeats[k])
            times[k].append(t)
    return outs, times


def _round_ratios(times, k, reference="MC-100"):
    """``reference``'s time over ``k``'s, round by round (both timed in the same rounds)."""
    return [m / a for m, a in zip(times[reference], times[k])]


def compare(name, model, guide, x, y, log, reference=0, variants=None, sequential=True):
    """One table: analytic variants against MC-100 (vectorised, and sequential where asked) and
    MC-1000, then the target ratios. The repeated calls are timed in interleaved rounds; a time is
    the median of the round bests, a speed-up the median of the per-round ratios. ``1st call``:
    construction and first call of a fresh predictor, timed in the same rounds (best of 3 per
    round), so that its ratio to a later call is taken between neighbouring measurements."""
    rows = {}
    variants = variants or {"default": {}, "paper": dict(activations="linearise", link="probit")}
    repeated, preds = {}, {}
    for label, kw in variants.items():
        pred = preds[label] = ps.infer.AnalyticPredictive(model, guide, **kw)
        pred(x)
        repeated[label] = lambda pred=pred: pred(x)["probs"]
        # a fresh predictor each time: construction and first call, timed in the same rounds
        repeated[label + " 1st"] = lambda kw=kw: ps.infer.AnalyticPredictive(model, guide, **kw)(x)["probs"]

    repeated["MC-100"] = _mc_probs(model, guide, x, 100)
    if sequential:
        repeated["MC-100 seq"] = _mc_probs(model, guide, x, 100, parallel=False)
    rounds = 7
    repeats = {k: 1 if k == "MC-100 seq" else 3 if k == "MC-100" or k.endswith(" 1st") else 5 for k in repeated}
    outs, times = _interleaved(repeated, repeats, rounds)
    for k in repeated:
        if k.endswith(" 1st"):
            continue
        t = statistics.median(times[k])
        if k in variants:
            t1 = statistics.median(times[k + " 1st"])
            assert torch.allclose(outs[k + " 1st"], outs[k])
        else:
            t1 = t
        rows[k] = (t, t1, outs[k])
    default = next(iter(variants))
    probs_a = rows[default][2]
    run = _mc_probs(model, guide, x, 1000)
    probs, t = _timed(run, repeats=1)
    rows["MC-1000"] = (t, t, probs)
    # a second, independent 1000-sample estimate: the reference's own noise
    mc1000_again = _mc_probs(model, guide, x, 1000, seed=1)()
    if reference:               # a long reference: the two draws above and more of the same
        draws = [rows["MC-1000"][2], mc1000_again] + [_mc_probs(model, guide, x, 1000, seed=k)()
                                                      for k in range(2, reference // 1000)]
        rows[f"MC-{reference}"] = (float("nan"), float("nan"), sum(draws) / len(draws))
    pd = preds[default]
    log(f"\n== {name}  (N_test={len(x)}, D={model.layout.dim}; default: activations={pd.activations}, "
        f"covariance={'full' if pd.full else 'diag'}"
        + (f" (measured change {pd.covariance_change:.2e} nats, tolerance {pd.covariance_tolerance:.0e})"
           if pd.covariance_change is not None else " (the two cannot differ here)") + ")")
    log("variants: " + "; ".join(f"{k} = {v or 'defaults'}" for k, v in variants.items()))
    log(f"timing: {rounds} interleaved rounds; time_s = median of the round bests, speed-up = median of the "
        "per-round ratios; 1st call = a fresh predictor's construction and first call (median of the round "
        "bests of 3, timed in the same rounds; 1st call / later: the median of the per-round ratios)")
    log(f"{'method':<11} {'time_s':>9} {'1st call':>9} {'NLL':>8} {'ECE':>8} {'|dp| vs default':>16}")
    nll = {}
    for k, (t, t1, pr) in rows.items():
        nll[k] = ps.metrics.nll(pr, y)
        log(f"{k:<11} {t:9.5f} {t1:9.5f} {nll[k]:8.4f} {ps.metrics.ece(pr, y):8.4f} "
            f"{float((pr - probs_a).abs().mean()):16.4f}")
    for k in variants:
        par = statistics.median(_round_ratios(times, k, "MC-100"))
        gap = nll[k] / nll["MC-1000"] - 1
        first = statistics.median(_round_ratios(times, k, reference=k + " 1st"))
        line = f"[{k}] vs MC-100 vectorised {par:.1f}x"
        if sequential:
            line += f", sequential {statistics.median(_round_ratios(times, k, 'MC-100 seq')):.1f}x"
        line += f"; NLL vs MC-1000 {100 * gap:+.2f}%; 1st call / later {first:.2f}x"
        log(line)
    again = ps.metrics.nll(mc1000_again, y)
    log(f"(Monte Carlo noise: MC-100 vs MC-1000 NLL {100 * (nll['MC-100'] / nll['MC-1000'] - 1):+.2f}%; a second "
        f"MC-1000 draw {100 * (again / nll['MC-1000'] - 1):+.2f}%)")
    if reference:
        log(f"[{default}] NLL vs MC-{reference}: {100 * (nll[default] / nll[f'MC-{reference}'] - 1):+.2f}%; "
            f"MC-1000 vs MC-{reference}: {100 * (nll['MC-1000'] / nll[f'MC-{reference}'] - 1):+.2f}%")
    return {"nll": nll, "times": times, "rows": rows, "mc100": repeated["MC-100"]}


def _mc_probs(model, guide, x, S, parallel=True, seed=0):
    """Monte Carlo class probabilities from ``S`` draws of the posterior. AutoNormal: ``Predictive``
    through the guide, the softmax of the network output at each draw, averaged. A Laplace guide:
    ``Predictive`` through it (the route a user takes, drawing its linearised network) is what is
    timed, and the probabilities are those of ``S`` draws of the same Gaussian logits
    (``guide.predict(link="mc")``; the class draws ``Predictive`` returns would only give
    frequencies)."""
    if hasattr(guide, "flat_gaussian") or hasattr(guide, "flat_posterior"):
        p = Predictive(model, guide=guide, num_samples=S, parallel=parallel, return_sites=["obs"])
        gen = torch.Generator().manual_seed(1000 * seed + S)
        probs = []

        def run():      # times the Predictive call only; the probabilities are drawn once per call of
            with torch.no_grad():       # _mc_probs (a fresh estimate each: see the MC-1000 noise line)
                p(x)
            if not probs:
                probs.append(guide.predict(x, link="mc", num_samples=S, generator=gen))
            return probs[0]
        return run
    p = Predictive(model, guide=guide, num_samples=S, parallel=parallel, return_sites=["_RETURN"])

    def run():
        with torch.no_grad():
            return torch.softmax(p(x)["_RETURN"], -1).mean(0)
    return run


def subnet_tradeoff(model, guide, x, y, log, nll, mc100, ranks=(5, 30, 100)):
    """Would approximating the subnetwork's covariance buy the speed? Each row replaces the dense
    ``k x k`` covariance ``S`` before the analytic predictive: ``diagonal`` keeps its variances only;
    ``top-r`` keeps its ``r`` largest eigenpairs ``U = Q_r diag(lambda_r)^(1/2)`` and, so that every
    weight keeps its variance, the independent remainder ``diag(S - U U^T) >= 0``. Timed against
    MC-100 as in :func:`compare`; NLL against the MC-1000 estimate (and the long reference)."""
    from pyro_subnet.infer.analytic import FlatPosterior

    g = guide.flat_gaussian()
    L = g.scale_tril.detach().double()
    cov = L @ L.T
    eigval, eigvec = torch.linalg.eigh(cov)
    dim, cast = g.mean.numel(), dict(dtype=g.mean.dtype, device=g.mean.device)

    def posterior(var_subnet, factor=None):
        var = torch.zeros(dim, **cast)
        var[g.indices] = var_subnet.to(**cast)
        return FlatPosterior(g.mean.detach(), var, None if factor is None else g.indices,
                             None if factor is None else factor.to(**cast))
    posteriors = {"exact": posterior(torch.zeros_like(eigval), L), "diagonal": posterior(cov.diagonal())}
    for r in ranks:
        U = eigvec[:, -r:] * eigval[-r:].sqrt()
        posteriors[f"top-{r}"] = posterior((cov.diagonal() - (U ** 2).sum(-1)).clamp_min(0), U)
    fns = {}
    for k, post in posteriors.items():
        pred = ps.infer.AnalyticPredictive(model, post, activations="linearise")   # the guide's GLM predictive
        pred(x)
        fns[k] = lambda pred=pred: pred(x)["probs"]
    fns["MC-100"] = mc100
    rounds, repeats = 7, {k: 3 if k == "MC-100" else 5 for k in fns}
    outs, times = _interleaved(fns, repeats, rounds)
    refs = [k for k in nll if k.startswith("MC-") and k != "MC-100"]
    log(f"\n-- the same subnetwork with its covariance approximated (k = {len(g.indices)}, eigenvalues of S "
        f"{float(eigval.min()):.3f}..{float(eigval.max()):.3f}); timing as above")
    log(f"{'covariance':<10} {'time_s':>9} {'speed-up':>9} " + " ".join(f"{'NLL vs ' + k:>15}" for k in refs))
    for k in posteriors:
        speed = statistics.median(_round_ratios(times, k))
        gaps = " ".join(f"{100 * (ps.metrics.nll(outs[k], y) / nll[ref] - 1):+14.2f}%" for ref in refs)
        log(f"{k:<10} {statistics.median(times[k]):9.5f} {speed:8.1f}x {gaps}")


def train_autonormal(model, x, y, steps, lr=0.01):
    pyro.clear_param_store()
    guide = AutoNormal(model, init_scale=0.01)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": lr}), Trace_ELBO())
    for _ in range(steps):
        svi.step(x, y)
    return guide


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--out", default=None, help="also write the report here")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the training")
    ap.add_argument("--reference", type=int, default=0,
                    help="also compare with this many Monte Carlo samples (a multiple of 1000; e.g. 10000)")
    args = ap.parse_args()
    if args.reference and (args.reference % 1000 or args.reference < 2000):
        ap.error("--reference must be a multiple of 1000, at least 2000")
    torch.set_num_threads(1)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)
    log(f"benchmarks/analytic_predictive.py --steps {args.steps} --seed {args.seed} --reference {args.reference}  "
        f"(torch {torch.__version__}, 1 thread; ratios are taken within this run)")
    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    ds = ps.data.load_digits()
    x, y, xt, yt = ds.x_train, ds.y_train, ds.x_test, ds.y_test

    representations = {"default": {}, "diag": dict(covariance="diag"), "full": dict(covariance="full"),
                       "sobol": dict(link="sobol"),
                       "paper": dict(activations="linearise", link="probit", covariance="diag")}
    for widths in ((100,), (100, 100)):
        torch.manual_seed(args.seed)
        layers, d = [], 64
        for w in widths:
            layers += [nn.Linear(d, w), nn.Tanh()]
            d = w
        net = nn.Sequential(*layers, nn.Linear(d, 10))
        model = ps.nn.BayesianNet(net, likelihood="classification", prior_scale=1.0, subsample_size=128)
        guide = train_autonormal(model, x, y, args.steps)
        model.subsample_size = None
        arch = "-".join(str(v) for v in (64, *widths, 10))
        compare(f"digits MLP {arch}, AutoNormal (SVI)", model, guide, xt, yt, log, args.reference,
                variants=representations)

    laplace = {"default": {}, "moments": dict(activations="moments")}
    torch.manual_seed(args.seed)
    net = nn.Sequential(nn.Linear(64, 50), nn.Tanh(), nn.Linear(50, 10))
    model = ps.nn.BayesianNet(net, likelihood="classification", prior_scale=1.0)
    pyro.clear_param_store()
    guide = ps.infer.AutoSubnetLaplace(model, subnet=ps.subnet.LargestVariance(300))
    guide.fit(x, y, progress=False)
    out = compare("digits MLP 64-50-10, AutoSubnetLaplace (300 weights)", model, guide, xt, yt, log,
                  args.reference, variants=laplace, sequential=False)
    subnet_tradeoff(model, guide, xt, yt, log, out["nll"], out["mc100"])
    sampled = ps.infer.AutoSampledLaplace(model, subnet=ps.subnet.All(), num_posterior_samples=64, progress=False)
    sampled.fit(x, y, map_theta=guide.loc)
    compare("digits MLP 64-50-10, AutoSampledLaplace (every weight, 64 samples)", model, sampled, xt, yt, log,
            args.reference, variants=laplace, sequential=False)

    # Pre-norm (LayerNorm at the start of each residual branch, as in ViT and GPT-2, which also end with
    # a LayerNorm before the head) and post-norm (after each residual addition: the
    # nn.TransformerEncoderLayer default).
    for norm_first, final_norm, name in ((True, False, "pre-norm"), (True, True, "pre-norm + final LayerNorm"),
                                         (False, False, "post-norm")):
        torch.manual_seed(args.seed)
        block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        tnet = nn.Sequential(nn.Unflatten(1, (8, 8)), nn.Linear(8, 16), block,
                             *([nn.LayerNorm(16)] if final_norm else []), nn.Flatten(), nn.Linear(8 * 16, 10))
        model = ps.nn.BayesianNet(tnet, likelihood="classification", prior_scale=1.0, subsample_size=128)
        guide = train_autonormal(model, x, y, args.steps)
        model.subsample_size = None
        compare(f"digits transformer ({name}), AutoNormal (SVI)", model, guide, xt, yt, log, args.reference,
                variants={"default": {}, "sobol": dict(link="sobol"),
                          "paper": dict(activations="linearise", link="probit")}, sequential=False)

    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
