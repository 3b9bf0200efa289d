"""Plots people would rather look at than read, written as PNG files.

Each function takes plain tensors/arrays (so it works for any method), draws on a new figure (or
the ``ax`` given), and saves it when ``path`` is given. Matplotlib is imported by the function
that draws (:func:`_pyplot`), so importing the package loads it for nobody who does not plot, and
its backend is the user's choice (the ``pyro-subnet`` command picks the headless Agg).
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch


def _pyplot():
    """``matplotlib.pyplot``, imported when a figure is drawn."""
    import matplotlib.pyplot as plt
    return plt


def _np(a):
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _finish(fig, path):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        _pyplot().close(fig)
    return fig


def reliability_bins(probs, y, num_bins: int = 15):
    """Per equal-width confidence bin: mean confidence, accuracy and count."""
    probs, y = _np(probs), _np(y)
    conf, pred = probs.max(1), probs.argmax(1)
    correct = pred == y
    bins = np.clip(np.ceil(conf * num_bins).astype(int) - 1, 0, num_bins - 1)
    mean_conf = np.array([conf[bins == b].mean() if (bins == b).any() else np.nan for b in range(num_bins)])
    acc = np.array([correct[bins == b].mean() if (bins == b).any() else np.nan for b in range(num_bins)])
    count = np.array([(bins == b).sum() for b in range(num_bins)])
    return mean_conf, acc, count


def reliability_diagram(results: Dict[str, object], y, num_bins: int = 10, path: Optional[str] = None,
                        columns: int = 4):
    """One small panel per method (``{name: probs}``): accuracy against confidence in equal-width
    bins, each bar's count written above it, the diagonal (perfect calibration) dashed and the ECE
    in the title. Bins with few examples are drawn pale: their accuracy is noisy."""
    plt = _pyplot()
    names = list(results)
    rows = max(1, -(-len(names) // columns))
    cols = min(columns, max(1, len(names)))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False, sharex=True, sharey=True)
    edges = np.linspace(0, 1, num_bins + 1)
    width = 1.0 / num_bins
    total = len(_np(y))
    for ax, name in zip(axes.flat, names):
        conf, acc, count = reliability_bins(results[name], y, num_bins)
        keep = count > 0
        alpha = np.where(count >= 0.02 * total, 0.9, 0.35)
        for b in np.nonzero(keep)[0]:
            ax.bar(edges[b], acc[b], width=width, align="edge", color="C0", alpha=alpha[b], edgecolor="white")
            ax.text(edges[b] + width / 2, min(acc[b] + 0.03, 0.97), str(int(count[b])), ha="center", va="bottom",
                    fontsize=6)
        ax.plot([0, 1], [0, 1], color="0.4", ls="--", lw=1)
        gap = float(np.nansum(count[keep] / total * np.abs(acc[keep] - conf[keep])))
        ax.set_title(f"{name}\nECE {gap:.3f}", fontsize=8)
        ax.set(xlim=(0, 1), ylim=(0, 1))
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("confidence", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy", fontsize=8)
    return _finish(fig, path)


def shift_curve(curves: Dict[str, Dict[float, float]], xlabel: str = "rotation (degrees)", ylabel: str = "test NLL",
                path: Optional[str] = None, ax=None):
    """One line per method: a score against the strength of the shift (``{name: {level: score}}``,
    level 0 the unshifted test set)."""
    plt = _pyplot()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.5, 4))
    for i, (name, points) in enumerate(curves.items()):
        levels = sorted(points)
        ax.plot(levels, [points[v] for v in levels], marker="o", ms=3, lw=1.5, label=name,
                ls="-" if i < 10 else "--")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{ylabel} under shift")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return _finish(fig, path)


def predictive_band(x_train, y_train, x_test, mean, std, title: str = "", truth=None,
                    path: Optional[str] = None, ax=None):
    """1D regression: data, predictive mean and +-2 standard deviations."""
    plt = _pyplot()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 4))
    xt, m, s = _np(x_test).reshape(-1), _np(mean).reshape(-1), _np(std).reshape(-1)
    order = np.argsort(xt)
    xt, m, s = xt[order], m[order], s[order]
    ax.fill_between(xt, m - 2 * s, m + 2 * s, alpha=0.3, label="±2 std")
    ax.plot(xt, m, lw=2, label="predictive mean")
    if truth is not None:
        ax.plot(xt, _np(truth).reshape(-1)[order], color="k", ls=":", lw=1, label="truth")
    ax.scatter(_np(x_train).reshape(-1), _np(y_train).reshape(-1), s=8, color="k", label="data")
    ax.set(xlabel="x", ylabel="y", title=title)
    ax.legend(fontsize=8)
    return _finish(fig, path)


SMC_SERIES = (("ess", "ESS (particles)"), ("acceptance_rate", "acceptance rate"),
              ("num_data", "data included"), ("step_size", "step size"))


def smc_traces(diagnostics: Dict[str, object], path: Optional[str] = None):
    """SMC per step: ESS (resampling steps marked), move acceptance rate, data included and
    step size (whichever are given).

    :param diagnostics: ``AnnealedSMC.diagnostics()`` (``{key: {"chain i": series}}``, one line a
        chain) or one chain's ``{key: series}``, with the keys ``ess``, ``acceptance_rate``,
        ``num_data``, ``step_size`` and optionally ``resampled``.
    """
    plt = _pyplot()
    def chains(v):
        return {c: _np(s) for c, s in v.items()} if isinstance(v, dict) else {"": _np(v)}

    keys = [(k, label) for k, label in SMC_SERIES if k in diagnostics]
    if not keys:
        raise ValueError(f"smc_traces: none of {[k for k, _ in SMC_SERIES]} in the diagnostics "
                         f"(got {sorted(diagnostics)}); pass AnnealedSMC.diagnostics().")
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2.0 * len(keys)), sharex=True, squeeze=False)
    resampled = chains(diagnostics["resampled"]) if "resampled" in diagnostics else {}
    for ax, (k, label) in zip(axes[:, 0], keys):
        for i, (c, v) in enumerate(chains(diagnostics[k]).items()):
            steps = np.arange(len(v))
            ax.plot(steps, v, marker=".", ms=3, color=f"C{i}", label=c or None)
            if k == "ess" and c in resampled:
                r = resampled[c].astype(bool)
                ax.plot(steps[r], v[r], "x", color=f"C{i}", ms=5)
        ax.set_ylabel(label)
    if any(c for c in chains(diagnostics[keys[0][0]])):
        axes[0, 0].legend(fontsize=7)
    axes[-1, 0].set_xlabel("SMC step")
    axes[0, 0].set_title("Annealed SMC" + (" (x: resampled)" if resampled else ""))
    return _finish(fig, path)


def inclusion_histogram(inclusion: Dict[str, object], path: Optional[str] = None, bins: int = 40):
    """Histogram of posterior inclusion probabilities P(weight in slab), all sites together:
    a spike-and-slab fit that has decided puts its mass near 0 and 1.

    :param inclusion: ``SpikeSlabSGHMC.inclusion_probabilities()``: site -> tensor.
    """
    plt = _pyplot()
    if not inclusion:
        raise ValueError("inclusion_histogram: no sites; pass SpikeSlabSGHMC.inclusion_probabilities().")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    values = np.concatenate([_np(v).reshape(-1) for v in inclusion.values()])
    ax.hist(values, bins=bins, range=(0, 1), color="C2")
    ax.set(xlabel="inclusion probability", ylabel="weights", yscale="log",
           title=f"Spike-and-slab inclusion ({(values > 0.5).mean():.1%} included)")
    return _finish(fig, path)


__all__ = ["reliability_diagram", "reliability_bins", "shift_curve", "predictive_band", "smc_traces",
           "inclusion_histogram"]
