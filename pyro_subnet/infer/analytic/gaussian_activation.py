"""The Gaussian activation that moment propagation carries from layer to layer.

The streamlined predictive of Li, Klasson, Solin and Trapp, *Streamlining Prediction in Bayesian
Deep Learning* (ICLR 2025), replaces the average over weight samples by one pass that carries the
mean and the (co)variance of every activation; the layers' rules live beside this module
(:mod:`.linear_moments`, :mod:`.nonlinear_moments`, :mod:`.norm_attention_moments`).

Correlated weights. The weight posterior is
:math:`\\theta = m + \\delta + E F \\varepsilon` with independent :math:`\\delta \\sim \\mathcal N(0,
\\mathrm{diag}(v))` and one shared :math:`\\varepsilon \\sim \\mathcal N(0, I_r)` (the factor ``F`` of a
full-rank, low-rank or subnetwork covariance). Each activation is carried as

.. math:: a = \\mu + A \\varepsilon + \\eta, \\qquad \\eta \\sim (0, \\Sigma) \\text{ independent of } \\varepsilon,

so a :class:`Gaussian` is ``(mean, var, A)``: ``var`` of shape ``(..., F)`` (diagonal: features
independent, the paper's mean-field activations) or ``(..., F, F)`` (full: covariance between
features of one example), and ``A`` of shape ``(..., F, r)`` (or ``None``; or an unformed
:class:`ScaledFactor`). The total covariance is :math:`\\Sigma + A A^\\top`. ``A`` carries the
correlations through the network, across layers and between a layer's input and its weights, to
first order in :math:`\\varepsilon` (the same linearisation as the activations); examples are
always independent, so with independent weights the columns of ``A`` may also be standard normals
of one example (:func:`~.linear_moments.linear`'s ``lift``).

These functions compute in place where that saves time on small tensors: they are for inference
(:class:`~pyro_subnet.infer.AnalyticPredictive` runs them under ``torch.no_grad``), not for autograd.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch


class ScaledFactor(NamedTuple):
    """A shared part :math:`A = \\mathrm{diag}(\\text{rows})\\, M\\, \\mathrm{diag}(\\text{cols})` per example,
    kept unformed: what :func:`linear` lifts (``M`` the weight mean ``(out, in)``, ``cols`` the input's
    standard deviations ``(..., in)``, ``rows`` the slopes of the activations since, ``(..., out)``).
    Formed, it would be an ``(..., out, in)`` tensor per example; unformed, its squared row norms cost
    one product with ``M^2`` and the next layer's :math:`W A` one with ``M``.

    ``matrix_sq_t`` is :math:`(M^2)^\\top`, ``(in, out)``."""

    rows: torch.Tensor
    matrix: torch.Tensor
    cols: torch.Tensor
    matrix_sq_t: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.rows.shape, self.cols.shape[-1]))

    def dense(self) -> torch.Tensor:
        return self.rows.unsqueeze(-1) * self.matrix * self.cols.unsqueeze(-2)


Factor = Union[torch.Tensor, ScaledFactor]


def _dense(A: Optional[Factor]) -> Optional[torch.Tensor]:
    """``A`` as a tensor ``(..., F, r)``."""
    return A.dense() if isinstance(A, ScaledFactor) else A


def _scale_rows(J: torch.Tensor, A: Factor) -> Factor:
    """:math:`\\mathrm{diag}(J) A` (``J`` of shape ``(..., F)``)."""
    if isinstance(A, ScaledFactor):
        return A._replace(rows=A.rows * J)
    return J.unsqueeze(-1) * A


def _left_matmul(weight: torch.Tensor, A: Factor) -> torch.Tensor:
    """:math:`W A` for a weight ``(out', F)``: for an unformed factor,
    :math:`((W \\mathrm{diag}(\\text{rows})) M) \\mathrm{diag}(\\text{cols})`, never forming ``A``."""
    if isinstance(A, ScaledFactor):
        return ((weight * A.rows.unsqueeze(-2)) @ A.matrix).mul_(A.cols.unsqueeze(-2))
    return weight @ A       # (a matmul: einsum copies A into another layout first)


class Gaussian(NamedTuple):
    """An activation :math:`\\mu + A\\varepsilon + \\eta` (see the module docstring); ``A`` a tensor or
    an unformed :class:`ScaledFactor`."""

    mean: torch.Tensor
    var: torch.Tensor
    A: Optional[Factor] = None

    @property
    def full(self) -> bool:
        """Whether ``var`` is a per-example covariance ``(..., F, F)``."""
        return self.var is not None and self.var.dim() == self.mean.dim() + 1

    @property
    def exact(self) -> bool:
        """Whether the activation is known (``var`` is ``None``: zero, e.g. the data, and no ``A``)."""
        return self.var is None and self.A is None

    def materialised(self) -> "Gaussian":
        """The same activation with ``var = 0`` written out when it is ``None``."""
        return self if self.var is not None else self._replace(var=torch.zeros_like(self.mean))

    def total_var(self) -> torch.Tensor:
        """Variances ``(..., F)`` including the shared part."""
        v = self.materialised().var
        v = v.diagonal(dim1=-2, dim2=-1) if self.full else v
        return v if self.A is None else v + _sq_norm(self.A)

    def total_cov(self) -> torch.Tensor:
        """Covariance ``(..., F, F)`` including the shared part."""
        var = self.var if self.full else torch.diag_embed(self.materialised().var)
        if self.A is None:
            return var
        A = _dense(self.A)
        return var + A @ A.transpose(-1, -2)


def _sq_norm(A: Factor) -> torch.Tensor:
    """:math:`\\sum_r A_{\\dots r}^2`, the variance that ``A`` carries (``vector_norm`` is ~3x faster on
    CPU than summing the squares of a wide ``A``)."""
    if isinstance(A, ScaledFactor):
        return (A.cols.square() @ A.matrix_sq_t).mul_(A.rows.square())
    return torch.linalg.vector_norm(A, dim=-1).square_()


def _diag(x: Gaussian) -> torch.Tensor:
    return x.var.diagonal(dim1=-2, dim2=-1) if x.full else x.var


def _per_column(fn: Callable[[torch.Tensor], torch.Tensor], A: torch.Tensor) -> torch.Tensor:
    """Apply a batch-first linear map ``fn`` to each column of ``A`` ``(N, *shape, r)``."""
    N, r = A.shape[0], A.shape[-1]
    cols = A.movedim(-1, 0).reshape(r * N, *A.shape[1:-1])
    out = fn(cols)
    return out.reshape(r, N, *out.shape[1:]).movedim(0, -1)


def reshape(fn: Callable[[torch.Tensor], torch.Tensor], x: Gaussian) -> Gaussian:
    """A batch-first reshape (``Flatten``, ``Unflatten``) of diagonal activations."""
    if x.exact:
        return Gaussian(fn(x.mean), None)
    x = x.materialised()
    return Gaussian(fn(x.mean), fn(x.var), None if x.A is None else _per_column(fn, _dense(x.A)))


def add(x: Gaussian, y: Gaussian) -> Gaussian:
    """A residual sum ``x + y``: the shared parts add exactly; the independent parts are taken as
    uncorrelated (the paper's assumption), so their variances add."""
    x, y = x.materialised(), y.materialised()
    A = _dense(x.A) if y.A is None else (_dense(y.A) if x.A is None else _dense(x.A) + _dense(y.A))
    return Gaussian(x.mean + y.mean, x.var + y.var, A)
