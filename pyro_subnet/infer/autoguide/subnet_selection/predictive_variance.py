"""A predictive-aware selection: keep the weights that carry the most predictive variance.

The Wasserstein criterion ranks weights by marginal variance alone, ignoring whether the outputs
depend on them, and so can pick weights with no predictive effect. :class:`PredictiveVariance`
instead maximises the predictive variance the subnetwork posterior keeps at probe inputs ``Z``,

.. math::

    \\max_{|S| = k} \\; \\sum_{z \\in Z} \\mathrm{tr}\\, J_S(z) H_{SS}^{-1} J_S(z)^\\top,
    \\qquad H = G + P_0,

greedily (forward selection past ``k``, then backward elimination back to ``k``). Adding weight ``c`` to ``S`` raises the objective by
:math:`\\|r_c\\|^2 / d_c` with :math:`r_c = J_c - J_S H_{SS}^{-1} H_{Sc}` and
:math:`d_c = H_{cc} - H_{cS} H_{SS}^{-1} H_{Sc}`: the Schur complements of a pivoted Cholesky
factorisation of :math:`\\begin{pmatrix} H & J^\\top \\\\ J & \\cdot \\end{pmatrix}` that pivots on
the weight block, so each greedy step is one rank-one update (done in blocks). The first step's
score, :math:`\\|J_d\\|^2 / (G_{dd} + p_d)` (Jacobian energy times diagonal-Laplace variance),
also prescreens a pool of candidates so the greedy never needs the ``D x D`` GGN.

The probes come from the training inputs only: half are training inputs, half points on
segments between random pairs of training inputs (where a network extrapolates between data).
The GGN for selection uses at most ``num_data`` training examples (scaled to the full set).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ...curvature import ggn, ggn_factor, jacobian
from ...randomness import resolve_seed
from .contract import SubnetSelection
from .strategies import training_data


def make_probes(x: torch.Tensor, num_probes: int, generator: torch.Generator) -> torch.Tensor:
    """``num_probes`` inputs: training inputs and interpolations between random pairs of them."""
    n = x.shape[0]
    n_train = num_probes // 2
    n_mix = num_probes - n_train
    pick = torch.randint(n, (n_train,), generator=generator).to(x.device)
    i = torch.randint(n, (n_mix,), generator=generator).to(x.device)
    j = torch.randint(n, (n_mix,), generator=generator).to(x.device)
    t = torch.rand(n_mix, *([1] * (x.dim() - 1)), generator=generator).to(x)
    return torch.cat([x[pick], x[i] + t * (x[j] - x[i])])


class PredictiveVariance(SubnetSelection):
    """Greedy maximisation of the retained predictive variance (module docstring).

    :param k: number of weights (or ``max_memory``).
    :param num_probes: probe inputs built from the training inputs.
    :param pool_size: candidates kept by the prescreen (default ``max(4k, 2048)``).
    :param num_data: training examples used for the selection GGN.
    :param block: pivots per greedy round (default ``ceil(k / 50)``).
    :param seed: seed of the probes and the data subsample (``None``: drawn from torch's global
        generator, so ``pyro.set_rng_seed`` governs it).
    :param overshoot: the greedy selects ``k + overshoot`` weights, then backward elimination
        drops the ``overshoot`` whose removal costs the least (default ``min(k, 256)``).

    >>> ps.subnet.PredictiveVariance(78)
    PredictiveVariance(k=78)
    """

    def __init__(self, k: Optional[int] = None, num_probes: int = 512, pool_size: Optional[int] = None,
                 num_data: int = 512, block: Optional[int] = None, seed: Optional[int] = None, max_memory=None,
                 exclude_normalisation: bool = True, batch_size: int = 256, overshoot: Optional[int] = None):
        super().__init__(k, max_memory, exclude_normalisation)
        self.overshoot = overshoot
        self.num_probes = num_probes
        self.pool_size = pool_size
        self.num_data = num_data
        self.block = block
        self.seed = seed
        self.batch_size = batch_size

    def _select(self, model, theta, data, mask, k, prior_precision, progress):
        fnet, lik = model.network, model.likelihood
        x, _ = training_data(data)
        x = x.to(theta.device)
        gen = torch.Generator().manual_seed(resolve_seed(self.seed, shared=False))
        probes = make_probes(x, self.num_probes, gen)
        n = x.shape[0]
        sub = torch.randperm(n, generator=gen)[: min(n, self.num_data)].to(x.device)
        scale = n / sub.numel()
        xs = x[sub]

        # Prescreen: Jacobian energy at the probes over diagonal-Laplace precision.
        energy = torch.zeros_like(theta)
        chunk = max(1, (2 ** 24) // max(1, theta.numel() * 8))
        for s in range(0, probes.shape[0], chunk):
            _, J = jacobian(fnet, theta, probes[s:s + chunk])
            energy += J.pow(2).sum((0, 1))
        h = scale * ggn(fnet, lik, theta, xs, structure="diag", batch_size=self.batch_size) + prior_precision
        score0 = torch.where(mask, energy / h, torch.full_like(h, -math.inf))
        num_pool = min(int(mask.sum()), self.pool_size or max(4 * k, 2048))
        pool = torch.topk(score0, num_pool).indices

        # Pool quantities: H_pool = A^T A + diag(p), probe Jacobians R (rows: probe x output).
        _, Jz = jacobian(fnet, theta, probes, pool)
        R = Jz.reshape(-1, num_pool).clone()
        f, Jd = jacobian(fnet, theta, xs, pool)
        A = ggn_factor(lik, f, Jd) * math.sqrt(scale)
        p = prior_precision[pool]
        d = A.pow(2).sum(0) + p
        k_final = k
        extra = min(k, 256) if self.overshoot is None else self.overshoot
        k = min(num_pool, k + extra)
        LH = theta.new_zeros(k, num_pool)
        chosen = torch.empty(k, dtype=torch.long, device=theta.device)
        avail = torch.ones(num_pool, dtype=torch.bool, device=theta.device)
        block = self.block or math.ceil(k / 50)
        t = 0
        while t < k:
            b = min(block, k - t)
            score = R.pow(2).sum(0) / d.clamp_min(1e-30)
            score = torch.where(avail, torch.nan_to_num(score, nan=0.0), torch.full_like(score, -math.inf))
            top = torch.topk(score, b).indices
            C = A.T @ A[:, top]
            C[top, torch.arange(b, device=top.device)] += p[top]
            if t:
                C -= LH[:t].T @ LH[:t, top]
            LHb = theta.new_zeros(b, num_pool)
            LJb = theta.new_zeros(b, R.shape[0])
            for j in range(b):
                pj = top[j]
                col = C[:, j] - LHb[:j].T @ LHb[:j, pj]
                dj = (d[pj] - LHb[:j, pj].pow(2).sum()).clamp_min(1e-30)
                rj = R[:, pj] - LJb[:j].T @ LHb[:j, pj]
                LHb[j] = col / dj.sqrt()
                LJb[j] = rj / dj.sqrt()
            d = d - LHb.pow(2).sum(0)
            R -= LJb.T @ LHb
            LH[t:t + b] = LHb
            chosen[t:t + b] = top
            avail[top] = False
            t += b
        if k > k_final:
            chosen = self._backward(chosen, A, p, Jz.reshape(-1, num_pool), k_final)
        return pool[chosen]

    @staticmethod
    def _backward(S, A, p, Jz, k):
        """Backward elimination from the greedy's overshoot down to ``k``: with
        :math:`B = H_{SS}^{-1}` and :math:`C = J_S^\\top J_S`, dropping ``j`` loses
        :math:`(B C B)_{jj} / B_{jj}` of the objective; drop the cheapest, update ``B`` by a
        rank-one downdate, repeat."""
        AS = A[:, S]
        B = torch.linalg.inv(AS.T @ AS + torch.diag(p[S]))
        JS = Jz[:, S]
        C = JS.T @ JS
        keep = torch.ones(len(S), dtype=torch.bool, device=S.device)
        bcb = torch.diagonal(B @ C @ B).clone()
        for _ in range(len(S) - k):
            loss = torch.where(keep, bcb / torch.diagonal(B), torch.full_like(bcb, float("inf")))
            j = int(torch.argmin(loss))
            b = B[:, j].clone()
            Cb = C @ b
            BCb = B @ Cb
            bjj = b[j]
            bcb = bcb - 2 * b * BCb / bjj + b ** 2 * (b @ Cb) / bjj ** 2
            B = B - torch.outer(b, b) / bjj
            keep[j] = False
        return S[keep]
