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
needed (:func:`~pyro_subnet.infer.curvature.ggn_vp`); memory is ``O(K k)``.

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

Under ``torch.distributed`` (as :func:`~pyro_subnet.infer.fit_map`) every rank passes the whole
data set as tensors; each data sum runs over the rank's share and is all-reduced, so all ranks
take the same CG / SGD steps. The per-example noise :math:`e_n` is drawn in fixed chunks of
``batch_size`` examples, each from its own generator keyed by the chunk's position in the data,
so the draws, and hence the samples, do not depend on how the data are split between ranks.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from tqdm.auto import tqdm, trange

from ...data.batches import iter_batches, num_examples, tensors
from .. import curvature, distributed

# Odd 63-bit constant (golden ratio) that spreads chunk indices over the seed space.
_CHUNK_STRIDE = 0x9E3779B97F4A7C15 % 2 ** 63


def _share(data, what: str):
    """This rank's share of ``data`` (all of it in one process)."""
    if not distributed.is_active():
        return data
    x, y = distributed.tensor_data(data, what)
    x, y, _ = distributed.local_share(x, y)
    return x if y is None else (x, y)


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
    """One pass over the data: ``s_k = sum_n J_n^T L_n e_{n,k}`` by vector-Jacobian products.

    ``u`` and a base seed come from ``generator``; the noise of examples ``[cB, (c+1)B)`` (``B =
    batch_size``) from a generator seeded by ``(base, c)``, so any split of the data between ranks
    sees the same ``e_n``."""
    k = fnet.layout.dim if indices is None else len(indices)
    dev, dt = theta.device, theta.dtype
    gen_device = None if generator is None else generator.device

    def randn(*shape, gen=generator):  # draws on the generator's device (CPU by default), then moved
        return torch.randn(*shape, generator=gen, dtype=dt, device=gen_device).to(dev)

    u = randn(num_samples, k)
    base = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=gen_device))
    # Ranks whose global generators differ still agree: rank 0's draws count.
    u, base = distributed.broadcast_object((u, base))
    if distributed.is_active():
        x, _ = distributed.tensor_data(data, "draw_targets")
        x, _, offset = distributed.local_share(x)
    else:
        x, offset = tensors(data)[0], 0
    s = torch.zeros(num_samples, k, device=dev, dtype=dt)
    n = x.shape[0]
    chunks = range(offset // batch_size, (offset + n - 1) // batch_size + 1) if n else range(0)
    chunk_gen = torch.Generator(device=gen_device or "cpu")
    for c in tqdm(chunks, desc="STO draws", disable=not progress, leave=False):
        lo, hi = max(c * batch_size, offset), min((c + 1) * batch_size, offset + n)
        xb = x[lo - offset:hi - offset].to(dev)
        f = fnet.flat(theta, xb)
        chunk_gen.manual_seed((base + c * _CHUNK_STRIDE) % 2 ** 63)
        e = randn(num_samples, batch_size, *f.shape[1:], gen=chunk_gen)[:, lo - c * batch_size:hi - c * batch_size]
        cot = torch.einsum("nop,knp->kno", likelihood.output_hessian_sqrt(f), e)
        s = s + curvature.vjp(fnet, theta, xb, cot, indices)
    return STOTargets(u, distributed.all_reduce_sum(s))


def full_ggn_vp(fnet, likelihood, theta, data, V, indices=None, batch_size: int = 256) -> torch.Tensor:
    """``G V`` over the whole data set, batch by batch (all-reduced over ranks)."""
    out = torch.zeros_like(V)
    for xb, _ in iter_batches(_share(data, "full_ggn_vp"), batch_size, device=theta.device):
        out = out + curvature.ggn_vp(fnet, likelihood, theta, xb, V, indices)
    return distributed.all_reduce_sum(out)


def output_gradient_term(fnet, likelihood, theta, data, indices=None, batch_size: int = 256) -> torch.Tensor:
    """:math:`\\sum_n J_n^\\top \\nabla_f \\log p(y_n | f_n)` at ``theta`` over the whole data set
    (:func:`~pyro_subnet.infer.curvature.log_likelihood_gradient` of this rank's share, summed
    over ranks): the data part of the Gauss-Newton step towards the linearised model's optimum."""
    share = _share(data, "output_gradient_term")
    return distributed.all_reduce_sum(curvature.log_likelihood_gradient(fnet, likelihood, theta, share, indices,
                                                                        batch_size))


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
    # A right-hand side near zero (the mean step at a converged MAP) has its residual divided by a
    # norm floored at a millionth of the largest, so that its relative residual cannot stall the batch.
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
    falls below ``tol`` (checked once an epoch). Under ``torch.distributed`` every rank draws the
    same mini-batch and computes the GGN product of its part of it (then all-reduced), as
    ``DistributedDataParallel`` splits a global batch."""
    x, y = tensors(data)
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
            mine = idx[distributed.shard(len(idx))]
            gv = curvature.ggn_vp(fnet, likelihood, theta, x[mine], look, indices) if len(mine) \
                else torch.zeros_like(look)
            grad = (n / len(idx)) * distributed.all_reduce_sum(gv) + a * look - b
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


def effective_dimension(sol: STOSolution, groups: Optional[torch.Tensor] = None,
                        num_groups: Optional[int] = None) -> torch.Tensor:
    """:math:`\\gamma = \\frac1K \\sum_k \\zeta_k^\\top G \\zeta_k` (an unbiased estimate of
    :math:`\\mathrm{tr}(H^{-1} G)`); with ``groups`` (a group id per coordinate), one
    :math:`\\gamma_g = \\frac1K \\sum_k \\zeta_{k,g}^\\top (G \\zeta_k)_g` per group, shape ``(num_groups,)``."""
    per_coord = (sol.samples * sol.g_samples).mean(0)
    if groups is None:
        return per_coord.sum()
    num_groups = int(groups.max()) + 1 if num_groups is None else num_groups
    return torch.zeros(num_groups, dtype=per_coord.dtype, device=per_coord.device).index_add_(0, groups, per_coord)
