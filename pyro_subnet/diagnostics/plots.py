"""Plots people would rather look at than read, written as PNG files.

Each function takes plain tensors/arrays (so it works for any method), draws on a new figure (or
the ``ax`` given), and saves it when ``path`` is given. Matplotlib runs headless (Agg).
"""

from __future__ import annotations

from typing import Dict, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _np(a):
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _finish(fig, path):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
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


def reliability_diagram(results: Dict[str, object], y, num_bins: int = 15, path: Optional[str] = None,
                        ax=None):
    """Accuracy against confidence for each method (``{name: probs}``); the diagonal is perfect
    calibration and the gap to it is what ECE averages."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfect calibration")
    for name, probs in results.items():
        conf, acc, count = reliability_bins(probs, y, num_bins)
        keep = count > 0
        ax.plot(conf[keep], acc[keep], marker="o", ms=4, label=name)
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability diagram")
    ax.legend(fontsize=8, loc="upper left")
    return _finish(fig, path)


def predictive_band(x_train, y_train, x_test, mean, std, title: str = "", truth=None,
                    path: Optional[str] = None, ax=None):
    """1D regression: data, predictive mean and +-2 standard deviations."""
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
    if not inclusion:
        raise ValueError("inclusion_histogram: no sites; pass SpikeSlabSGHMC.inclusion_probabilities().")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    values = np.concatenate([_np(v).reshape(-1) for v in inclusion.values()])
    ax.hist(values, bins=bins, range=(0, 1), color="C2")
    ax.set(xlabel="inclusion probability", ylabel="weights", yscale="log",
           title=f"Spike-and-slab inclusion ({(values > 0.5).mean():.1%} included)")
    return _finish(fig, path)


__all__ = ["reliability_diagram", "reliability_bins", "predictive_band", "smc_traces", "inclusion_histogram"]
