"""Sample-then-optimise: posterior samples of a linearised network without a covariance matrix.

Antorán, Padhy, Barbano, Nalisnick, Janz, Hernández-Lobato, *Sampling-based inference for large
linear models, with application to linearised Laplace* (ICLR 2023); Antorán, *Scalable Bayesian
Inference in the Era of Deep Learning* (PhD thesis, 2024), ch. 4-5.

The linearised Laplace posterior over the coordinates ``S`` (``k`` of them) is Gaussian with
precision :math:`H = G + A`, :math:`G = \\sum_n J_n^\\top \\Lambda_n J_n` (the GGN) and
:math:`A = \\mathrm{diag}(a)` the prior precision. A zero-mean sample :math:`\\zeta \\sim N(0, H^{-1})`
is the minimiser of the randomised quadratic (the paper's low-variance objective)

.. math::

    \\zeta = \\arg\\min_z \\tfrac12 z^\\top G z + \\tfrac12 (z - t)^\\top A (z - t),\\qquad
    t = A^{-1/2} u + A^{-1} \\sum_n J_n^\\top L_n e_n,\\quad u, e_n \\sim N(0, I),

with :math:`L_n L_n^\\top = \\Lambda_n`: then :math:`\\zeta = H^{-1} A t` and
:math:`\\mathrm{Cov}(\\zeta) = H^{-1}(A + G)H^{-1} = H^{-1}`. Only Jacobian-vector products are
needed (:func:`~pyro_subnet.infer.autoguide.curvature.ggn_vp`); memory is ``O(K k)``.

All ``K`` samples are solved together, by batched conjugate gradients (full-batch GGN products,
Jacobi-preconditioned with the diagonal of ``G`` estimated from the same random draws:
:math:`E[(J^\\top L e)^2] = \\mathrm{diag}(G)`), or by Nesterov SGD with Polyak averaging on
mini-batches as in the paper. The posterior mean is the optimum of the linearised model,
:math:`\\bar\\theta = \\theta_* + H^{-1}(\\sum_n J_n^\\top \\nabla_f \\log p(y_n|f_n) - A\\theta_*)`
(one Gauss-Newton step, exact for a Gaussian likelihood), so that the EM update of the prior
precision (MacKay's fixed point, with the function-space estimate of the effective number of
parameters from the samples),

.. math:: \\gamma = \\frac1K\\sum_k \\zeta_k^\\top G \\zeta_k, \\qquad a \\leftarrow \\gamma / \\|\\bar\\theta\\|^2,

converges to the evidence-maximising prior precision. Between EM steps the random draws are
kept and the targets rescaled, so every solve warm-starts from the last.

The functions here are small and pure over :class:`STOTargets` / :class:`STOSolution`; the guide
:class:`~pyro_subnet.infer.AutoSampledLaplace` is the shell around them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from tqdm.auto import trange

from ..batches import iter_batches, num_examples
from . import curvature


class STOTargets(NamedTuple):
    """The random draws of the ``K`` objectives, kept so targets can be rescaled under EM."""

    prior_noise: torch.Tensor   # u, (K, k) standard normal
    data_noise: torch.Tensor    # s = sum_n J_n^T L_n e_n, (K, k)

    def targets(self, a: torch.Tensor) -> torch.Tensor:
        """:math:`t = A^{-1/2} u + A^{-1} s` for prior precision ``a`` (``(k,)`` or scalar)."""
        return self.prior_noise / a.sqrt() + self.data_noise / a

    def diag_ggn(self) -> torch.Tensor:
        """Unbiased estimate of ``diag(G)`` from the same draws (``E[s^2] = diag G``)."""
        return self.data_noise.pow(2).mean(0)


class STOSolution(NamedTuple):
    samples: torch.Tensor     # zeta, (K, k), zero-mean posterior samples
    g_samples: torch.Tensor   # G zeta, (K, k): gives the effective number of parameters for free
    iterations: int
    residual: float           # relative residual ||H z - b|| / ||b|| at the end


def draw_targets(fnet, likelihood, theta, data, num_samples: int, indices=None, batch_size: int = 256,
                 generator: Optional[torch.Generator] = None, progress: bool = False) -> STOTargets:
    """One pass over the data: ``s_k = sum_n J_n^T L_n e_{n,k}`` by vector-Jacobian products."""
    k = fnet.layout.dim if indices is None else len(indices)
    dev, dt = theta.device, theta.dtype

    def randn(*shape):  # draws on the generator's device (CPU by default), then moved
        return torch.randn(*shape, generator=generator, dtype=dt,
                           device=None if generator is None else generator.device).to(dev)

    u = randn(num_samples, k)
    s = torch.zeros(num_samples, k, device=dev, dtype=dt)
    for xb, _ in iter_batches(data, batch_size, device=dev, progress=progress, desc="STO draws"):
        f = fnet.flat(theta, xb)
        e = randn(num_samples, *f.shape)
        cot = torch.einsum("nop,knp->kno", likelihood.output_hessian_sqrt(f), e)
        s = s + curvature.vjp(fnet, theta, xb, cot, indices)
    return STOTargets(u, s)


def full_ggn_vp(fnet, likelihood, theta, data, V, indices=None, batch_size: int = 256) -> torch.Tensor:
    """``G V`` over the whole data set, batch by batch."""
    out = torch.zeros_like(V)
    for xb, _ in iter_batches(data, batch_size, device=theta.device):
        out = out + curvature.ggn_vp(fnet, likelihood, theta, xb, V, indices)
    return out


def output_gradient_term(fnet, likelihood, theta, data, indices=None, batch_size: int = 256) -> torch.Tensor:
    """:math:`\\sum_n J_n^\\top \\nabla_f \\log p(y_n | f_n)` at ``theta`` (the data part of the
    Gauss-Newton step towards the linearised model's optimum)."""
    total = None
    for xb, yb in iter_batches(data, batch_size, device=theta.device):
        if yb is None:
            raise ValueError("the posterior mean needs targets: pass (x, y), not x alone.")
        f = fnet.flat(theta, xb).detach().requires_grad_(True)
        g = torch.autograd.grad(likelihood.log_prob(f, yb).sum(), f)[0]
        term = curvature.vjp(fnet, theta, xb, g, indices)
        total = term if total is None else total + term
    return total


def conjugate_gradients(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x0: torch.Tensor,
                        precond: torch.Tensor, tol: float = 1e-6, max_iter: int = 500,
                        progress: bool = False, desc: str = "CG"):
    """Solve ``M x_k = b_k`` for every row ``k`` at once (``M`` symmetric positive definite),
    Jacobi-preconditioned by ``precond`` (the diagonal of ``M``, shape ``(dim,)``).

    :returns: ``(x, M x, iterations, relative residual)``.
    """
    x = x0.clone()
    Mx = matvec(x)
    r = b - Mx
    # A right-hand side near zero (the mean step at a converged MAP) is measured against the
    # others, so that its relative residual cannot stall the batch.
    bnorm = b.norm(dim=-1)
    bnorm = bnorm.clamp_min(max(1e-6 * float(bnorm.max()), torch.finfo(b.dtype).tiny))
    z = r / precond
    p = z.clone()
    rz = (r * z).sum(-1)
    it = 0
    rel = float((r.norm(dim=-1) / bnorm).max())
    bar = trange(max_iter, desc=desc, disable=not progress, leave=False)
    for it in bar:
        if rel < tol:
            break
        Mp = matvec(p)
        alpha = rz / (p * Mp).sum(-1).clamp_min(torch.finfo(b.dtype).tiny)
        x = x + alpha[:, None] * p
        Mx = Mx + alpha[:, None] * Mp
        r = r - alpha[:, None] * Mp
        rel = float((r.norm(dim=-1) / bnorm).max())
        z = r / precond
        rz_new = (r * z).sum(-1)
        p = z + (rz_new / rz.clamp_min(torch.finfo(b.dtype).tiny))[:, None] * p
        rz = rz_new
        if progress:
            bar.set_postfix(residual=f"{rel:.2e}")
    else:
        it = max_iter
    return x, Mx, it, rel


def solve_cg(fnet, likelihood, theta, data, a: torch.Tensor, b: torch.Tensor, x0: torch.Tensor,
             diag_g: torch.Tensor, indices=None, batch_size: int = 256, tol: float = 1e-6,
             max_iter: int = 500, progress: bool = False) -> STOSolution:
    """Solve :math:`(G + A) x = b` for each row of ``b`` with full-batch GGN products."""
    def matvec(V):
        return full_ggn_vp(fnet, likelihood, theta, data, V, indices, batch_size) + a * V

    x, Hx, it, rel = conjugate_gradients(matvec, b, x0, diag_g + a, tol, max_iter, progress, "sample-then-optimise")
    return STOSolution(x, Hx - a * x, it, rel)


def solve_sgd(fnet, likelihood, theta, data, a: torch.Tensor, b: torch.Tensor, x0: torch.Tensor,
              indices=None, batch_size: int = 256, lr: float = 1e-3, momentum: float = 0.9,
              num_epochs: int = 50, polyak: float = 0.01, tol: float = 1e-3,
              generator: Optional[torch.Generator] = None, progress: bool = False) -> STOSolution:
    """The paper's optimiser: Nesterov SGD on mini-batch estimates of
    :math:`\\nabla = G z + A z - b` (data term scaled by ``N / B``), with geometric (Polyak)
    averaging of the iterates. Converged when the averaged iterate's full-batch relative residual
    falls below ``tol`` (checked once an epoch)."""
    x, y = data if isinstance(data, (tuple, list)) else (data, None)
    n = num_examples(data)
    z, v, avg = x0.clone(), torch.zeros_like(x0), x0.clone()
    bnorm = b.norm(dim=-1).clamp_min(torch.finfo(b.dtype).tiny)
    rel, epoch = float("inf"), 0
    bar = trange(num_epochs, desc="sample-then-optimise (SGD)", disable=not progress, leave=False)
    for epoch in bar:
        perm = torch.randperm(n, generator=generator).to(theta.device)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            look = z + momentum * v  # Nesterov look-ahead
            grad = (n / len(idx)) * curvature.ggn_vp(fnet, likelihood, theta, x[idx], look, indices) \
                + a * look - b
            v = momentum * v - lr * grad
            z = z + v
            avg = (1 - polyak) * avg + polyak * z
        Gavg = full_ggn_vp(fnet, likelihood, theta, (x, y), avg, indices, batch_size)
        rel = float(((Gavg + a * avg - b).norm(dim=-1) / bnorm).max())
        if progress:
            bar.set_postfix(residual=f"{rel:.2e}")
        if rel < tol:
            break
    return STOSolution(avg, Gavg, epoch + 1, rel)


def effective_dimension(sol: STOSolution) -> torch.Tensor:
    """:math:`\\gamma = \\frac1K \\sum_k \\zeta_k^\\top G \\zeta_k` (an unbiased estimate of
    :math:`\\mathrm{tr}(H^{-1} G)`)."""
    return (sol.samples * sol.g_samples).sum(-1).mean()
