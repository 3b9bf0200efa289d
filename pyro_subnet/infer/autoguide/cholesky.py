"""The Cholesky factors of a Laplace posterior: of its precision, and of its covariance without
forming the inverse.

The Laplace guides hold the precision :math:`P = G_S + P_0` over the subnetwork and need
:math:`L` with :math:`L L^\\top = P^{-1}` (:func:`precision_to_scale_tril`) to sample and to build
the :class:`~pyro_subnet.infer.curvature.FlatGaussian` they hand to other code. A factorisation
that fails says what to change (:class:`NotPositiveDefiniteError`).
"""

from __future__ import annotations

import torch


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

    A precision in a low precision (float32) that does not factorise there is factorised again in
    float64 and the factor returned in its own dtype: a posterior with a small noise and a weak
    prior has a condition number beyond float32's ~1e7 (the factorisation fails) while its
    covariance factor is well representable.
    """
    try:
        return _scale_tril(precision)
    except NotPositiveDefiniteError:
        if precision.dtype == torch.float64 or not torch.isfinite(precision).all():
            raise
        return _scale_tril(precision.double()).to(precision.dtype)


def _scale_tril(precision: torch.Tensor) -> torch.Tensor:
    Lf = cholesky(torch.flip(precision, (-2, -1)))
    L_inv = torch.transpose(torch.flip(Lf, (-2, -1)), -2, -1)
    eye = torch.eye(precision.shape[-1], dtype=precision.dtype, device=precision.device)
    return torch.linalg.solve_triangular(L_inv, eye, upper=False)
