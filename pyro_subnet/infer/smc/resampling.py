"""Resampling schemes: pure functions ``(generator, weights, num_samples) -> ancestor indices``.

Each scheme draws ancestor indices ``a_1..a_M`` with :math:`\\mathbb{E}[\\#\\{j: a_j = i\\}] = M w_i`
(unbiased offspring counts), so that the equally weighted resampled particles represent the same
distribution as the weighted ones. They differ in variance: multinomial is i.i.d.; stratified
draws one uniform per stratum :math:`((j + U_j)/M)`; systematic shares one uniform
:math:`((j + U)/M)` and has the lowest variance in practice (Douc, Cappe and Moulines 2005,
*Comparison of resampling schemes for particle filtering*).

>>> from pyro_subnet.infer.smc import systematic
>>> g = torch.Generator().manual_seed(0)
>>> systematic(g, torch.tensor([0.5, 0.25, 0.25]), 4).tolist()
[0, 0, 1, 2]
"""

from __future__ import annotations

from typing import Callable, Dict

import torch


def _check(weights: torch.Tensor, num_samples: int) -> None:
    if weights.dim() != 1 or weights.numel() == 0:
        raise ValueError(f"resampling: weights must be a non-empty 1-D tensor, got shape {tuple(weights.shape)}.")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"resampling: num_samples must be a positive integer, got {num_samples!r}.")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("resampling: weights must be finite and non-negative (normalise log-weights with "
                         "softmax first).")


def _invert_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Indices ``i`` with ``cdf[i-1] <= u < cdf[i]`` for sorted uniforms ``u`` in [0, 1)."""
    cdf = torch.cumsum(weights / weights.sum(), 0)
    # Rounding can leave cdf[-1] slightly below 1: clamp so no index falls off the end.
    return torch.searchsorted(cdf, u, right=True).clamp_(max=weights.numel() - 1)


def multinomial(generator: torch.Generator, weights: torch.Tensor, num_samples: int) -> torch.Tensor:
    """I.i.d. draws from ``Categorical(weights)``."""
    _check(weights, num_samples)
    return torch.multinomial(weights / weights.sum(), num_samples, replacement=True, generator=generator)


def stratified(generator: torch.Generator, weights: torch.Tensor, num_samples: int) -> torch.Tensor:
    """One uniform in each stratum ``[j/M, (j+1)/M)``."""
    _check(weights, num_samples)
    u = torch.rand(num_samples, generator=generator, dtype=weights.dtype, device=weights.device)
    u = (torch.arange(num_samples, dtype=weights.dtype, device=weights.device) + u) / num_samples
    return _invert_cdf(weights, u)


def systematic(generator: torch.Generator, weights: torch.Tensor, num_samples: int) -> torch.Tensor:
    """One shared uniform offset: ``u_j = (j + U) / M``."""
    _check(weights, num_samples)
    u = torch.rand(1, generator=generator, dtype=weights.dtype, device=weights.device)
    u = (torch.arange(num_samples, dtype=weights.dtype, device=weights.device) + u) / num_samples
    return _invert_cdf(weights, u)


RESAMPLERS: Dict[str, Callable[[torch.Generator, torch.Tensor, int], torch.Tensor]] = {
    "systematic": systematic,
    "stratified": stratified,
    "multinomial": multinomial,
}


def get_resampler(scheme) -> Callable[[torch.Generator, torch.Tensor, int], torch.Tensor]:
    """A resampling function from its name, or the callable itself."""
    if callable(scheme):
        return scheme
    if scheme not in RESAMPLERS:
        raise ValueError(f"resampling={scheme!r}: choose one of {sorted(RESAMPLERS)} or pass a function "
                         "(generator, weights, num_samples) -> indices.")
    return RESAMPLERS[scheme]
