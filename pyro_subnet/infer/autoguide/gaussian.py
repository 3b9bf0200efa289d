"""The Gaussian a Laplace guide hands to other code, and how to build its Cholesky factor.

A subnetwork Laplace posterior is degenerate in weight space: the ``k`` coordinates
``indices`` of the flat weight vector are Gaussian, every other weight sits at the MAP,

.. math:: \\theta_S \\sim \\mathcal{N}(\\hat\\theta_S, \\Sigma_S), \\quad \\Sigma_S = L L^\\top,
          \\qquad \\theta_r = \\hat\\theta_r \\; (r \\notin S).

:class:`FlatGaussian` is that object in one NamedTuple; it is the contract between the guides
and consumers such as :class:`~pyro_subnet.infer.AnalyticPredictive`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class FlatGaussian(NamedTuple):
    """A Gaussian over ``k`` coordinates of the flat weights, the rest fixed at ``mean``.

    :ivar mean: ``(D,)`` flat MAP weights in ``model.layout`` order.
    :ivar indices: ``(k,)`` LongTensor of the Gaussian coordinates.
    :ivar scale_tril: ``(k, k)`` lower Cholesky factor of the covariance over ``indices``.
    """

    mean: torch.Tensor
    indices: torch.Tensor
    scale_tril: torch.Tensor


class NotPositiveDefiniteError(ValueError):
    """The posterior precision could not be factorised."""


def cholesky(matrix: torch.Tensor, what: str = "posterior precision") -> torch.Tensor:
    """Lower Cholesky factor, with an error that says what to do when it fails."""
    L, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0 or not torch.isfinite(L).all():
        bad = not torch.isfinite(matrix).all()
        raise NotPositiveDefiniteError(
            f"The {what} ({matrix.shape[0]}x{matrix.shape[0]}, {matrix.dtype}) is not positive definite"
            + (" (it holds NaN or infinite entries: check the MAP weights and the data)." if bad else
               f" (the factorisation failed at row {int(info)}).")
            + " Fix: raise the prior precision (prior_precision=...), fit in float64 "
              "(model.double(), x.double()), or choose a smaller subnetwork."
        )
    return L


def precision_to_scale_tril(precision: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor ``L`` of ``precision^{-1}`` without forming the inverse.

    With ``F`` the reversal permutation, ``F P F = L_f L_f^T`` gives ``P = U U^T`` with the
    *upper* triangular ``U = F L_f F``, so ``P^{-1} = U^{-T} U^{-1}`` and ``L = U^{-T}`` is lower
    triangular: one Cholesky and one triangular solve (the trick of
    ``torch.distributions.multivariate_normal``).
    """
    Lf = cholesky(torch.flip(precision, (-2, -1)))
    L_inv = torch.transpose(torch.flip(Lf, (-2, -1)), -2, -1)
    eye = torch.eye(precision.shape[-1], dtype=precision.dtype, device=precision.device)
    return torch.linalg.solve_triangular(L_inv, eye, upper=False)
