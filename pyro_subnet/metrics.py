"""Predictive quality metrics.

All take tensors (or arrays) and return Python floats, averaged over examples.

* ``nll(probs, y)``: :math:`-\\frac1N\\sum_n \\log p_{n, y_n}` (classification), or
  ``nll(mean, y, var=var)``: the Gaussian :math:`\\frac1N\\sum_n \\tfrac12\\log(2\\pi v_n) +
  \\tfrac{(y_n-\\mu_n)^2}{2 v_n}` (regression, ``var`` the predictive variance, noise included).
* ``accuracy(probs, y)``: fraction of ``argmax probs == y``.
* ``ece(probs, y, num_bins=15)``: expected calibration error with equal-width confidence bins,
  :math:`\\sum_b \\frac{|B_b|}{N} |\\mathrm{acc}(B_b) - \\mathrm{conf}(B_b)|` (Guo et al., 2017).
* ``brier(probs, y)``: :math:`\\frac1N\\sum_n \\sum_c (p_{nc} - [y_n = c])^2`.
* ``rmse(mean, y)``: :math:`\\sqrt{\\frac1N \\sum_n (y_n - \\mu_n)^2}`.
* ``entropy(probs)``: the predictive entropy :math:`-\\sum_c p_{nc} \\log p_{nc}` per example.
* ``auroc(score_in, score_out)``: the area under the ROC curve of telling ``out`` from ``in`` by a
  score that should be larger out of distribution, :math:`P(s_{out} > s_{in}) + \\tfrac12
  P(s_{out} = s_{in})` (the Mann-Whitney statistic; 0.5 is chance, 1 is perfect).
"""

from __future__ import annotations

import math

import torch


def _t(a, dtype=None):
    t = torch.as_tensor(a)
    return t.to(dtype) if dtype is not None else t


def _check_probs(probs, y):
    probs = _t(probs, torch.float64)
    y = _t(y).long()
    if probs.dim() != 2 or probs.shape[0] != y.shape[0]:
        raise ValueError(f"expected probs of shape (N, C) and labels of shape (N,), got "
                         f"{tuple(probs.shape)} and {tuple(y.shape)}.")
    return probs, y


def nll(pred, y, var=None, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood (see the module docstring)."""
    if var is not None:
        mean, y, var = _t(pred, torch.float64).reshape(-1), _t(y, torch.float64).reshape(-1), _t(var, torch.float64).reshape(-1)
        if (var <= 0).any():
            raise ValueError("nll: the predictive variance must be positive.")
        return float((0.5 * torch.log(2 * math.pi * var) + 0.5 * (y - mean) ** 2 / var).mean())
    probs, y = _check_probs(pred, y)
    return float(-torch.log(probs.gather(1, y[:, None]).clamp_min(eps)).mean())


def accuracy(probs, y) -> float:
    probs, y = _check_probs(probs, y)
    return float((probs.argmax(1) == y).double().mean())


def ece(probs, y, num_bins: int = 15) -> float:
    probs, y = _check_probs(probs, y)
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    # Bin b holds confidences in (b/B, (b+1)/B]; confidence 0 cannot occur for a max-probability.
    bins = torch.clamp(torch.ceil(conf * num_bins).long() - 1, 0, num_bins - 1)
    total = 0.0
    for b in range(num_bins):
        m = bins == b
        if m.any():
            total += m.double().mean() * (correct[m].mean() - conf[m].mean()).abs()
    return float(total)


def brier(probs, y) -> float:
    probs, y = _check_probs(probs, y)
    onehot = torch.nn.functional.one_hot(y, probs.shape[1]).double()
    return float(((probs - onehot) ** 2).sum(1).mean())


def rmse(mean, y) -> float:
    mean, y = _t(mean, torch.float64).reshape(-1), _t(y, torch.float64).reshape(-1)
    return float(((mean - y) ** 2).mean().sqrt())


def entropy(probs) -> torch.Tensor:
    """Predictive entropy per example, ``(N, C) -> (N,)`` (nats)."""
    p = _t(probs, torch.float64)
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


def auroc(score_in, score_out) -> float:
    """AUROC of separating ``score_out`` (positives) from ``score_in`` by the score (see the module
    docstring), from the ranks of the pooled scores (ties get their average rank)."""
    a, b = _t(score_in, torch.float64).reshape(-1), _t(score_out, torch.float64).reshape(-1)
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("auroc: both score sets need at least one value.")
    pooled = torch.cat([a, b])
    order = torch.argsort(pooled)
    ranks = torch.empty_like(pooled)
    ranks[order] = torch.arange(1, len(pooled) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique(pooled, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, ranks)
    ranks = (sums / counts)[inverse]                        # average rank within ties
    r_out = ranks[len(a):].sum()
    return float((r_out - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


__all__ = ["nll", "accuracy", "ece", "brier", "rmse", "entropy", "auroc"]
