"""SGHMC inside an EM loop over a spike-and-slab prior, with pruning: sample and sparsify in one run.

Ke & Fan, *On the optimization and pruning for Bayesian deep learning* (2022) and Deng, Zhang,
Liang & Lin, *An Adaptive Empirical Bayesian Method for Sparse Deep Learning* (NeurIPS 2019).
The prior of a sparse site ``s`` with groups ``g`` of ``m_g`` weights (one weight, or one neuron /
conv filter = one row ``w[o, ...]``) is

.. math::

    w_g \\mid \\gamma_g \\sim \\gamma_g \\mathcal N(0, \\sigma_1^2 I) + (1 - \\gamma_g) \\mathcal N(0, \\sigma_0^2 I),
    \\qquad \\gamma_g \\sim \\text{Bernoulli}(\\delta_s).

After every SGHMC step (of :mod:`.integrator`):

* **E-step**: ``logit rho_g = logit delta + (m_g / 2) log(sigma_0^2 / sigma_1^2)
  + ||w_g||^2 / 2 (1/sigma_0^2 - 1/sigma_1^2)``, and ``kappa_g = rho_g / sigma_1^2 + (1 - rho_g) /
  sigma_0^2`` is the adaptive per-weight weight decay: the sampler's prior term is the expected
  complete-data log prior ``-kappa_g ||w_g||^2 / 2`` (Deng et al.'s ``Q``).
* **M-step** (opt-in, see ``inclusion_beta``, ``learn_slab_scale``):
  ``delta = (sum_g rho_g + a - 1) / (G + a + b - 2)`` (Beta(a, b) hyper-prior) and
  ``sigma_1^2 = (sum_g rho_g ||w_g||^2 + 2 b_1) / (sum_g rho_g m_g + 2 (a_1 + 1))`` (inverse-gamma
  hyper-prior with mode at the initial slab variance); the spike scale stays fixed unless
  ``learn_spike_scale`` (a shrinking spike makes the potential stiff).
* **Stochastic approximation**: every quantity moves as ``q <- (1 - omega_k) q + omega_k q_new``,
  ``omega_k = sa_c / (sa_A + k)^sa_alpha`` (Deng et al., Alg. 1).
* **Pruning**: between ``prune_start`` and ``prune_end`` (calls of ``sample``, default the second
  half of warm-up), the sparsity over all sparse sites together follows ``s_k = S (1 - (1 - p_k)^3)``
  (``p_k`` = progress in ``[0, 1]``, Zhu & Gupta 2017) and the groups of least magnitude are
  zeroed for good (a mask multiplies the position and velocity after every step), so pruned
  weights are exactly zero in every later draw.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Dict, NamedTuple, Optional, Sequence

import torch

from ...distributions import SpikeSlab
from ...nn.bridge import _base
from .sghmc import SGHMC


class EMState(NamedTuple):
    rho: Dict[str, torch.Tensor]        # site -> (G,) inclusion probabilities of the groups
    delta: Dict[str, float]             # site -> inclusion rate
    slab_var: Dict[str, float]
    spike_var: Dict[str, float]
    keep: Dict[str, torch.Tensor]       # site -> (G,) bool, False = pruned
    count: int


def _groups(w: torch.Tensor, group: str) -> torch.Tensor:
    """``(G, m)`` view of a site's weights: one weight per group, or one row ``w[o, ...]``."""
    return w.reshape(-1, 1) if group == "weight" else w.reshape(w.shape[0], -1)


def e_step(sq_norm, m, delta, slab_var, spike_var):
    """``P(gamma_g = 1 | w_g)`` from the squared group norms ``sq_norm`` (G,) of ``m`` weights."""
    logit = (math.log(delta / (1 - delta)) + 0.5 * m * math.log(spike_var / slab_var)
             + 0.5 * sq_norm * (1 / spike_var - 1 / slab_var))
    return torch.sigmoid(logit)


class SpikeSlabSGHMC(SGHMC):
    """SGHMC with EM over a spike-and-slab prior and pruning to a target sparsity (see the module
    docstring for the maths). Takes every argument of :class:`SGHMC`, and:

    :param model: a Bayesian network model (a user's PyroModule or a
        :class:`~pyro_subnet.nn.BayesianNet`; see :class:`~pyro_subnet.nn.ModelBridge`): its own
        prior is used for the weight sites that are not sparse; where a sparse site's prior is a
        :class:`~pyro_subnet.distributions.SpikeSlab`, its scales and inclusion probability are the
        defaults below. A noise site is sampled as by :class:`SGHMC`.
    :param spike_scale: ``sigma_0`` (default: the model's SpikeSlab, else 0.01).
    :param slab_scale: initial ``sigma_1`` (default: the model's SpikeSlab, else 1.0).
    :param inclusion_prior: initial inclusion rate ``delta`` (default: the model's SpikeSlab,
        else 0.5).
    :param inclusion_beta: ``(a, b)`` of the Beta hyper-prior on ``delta`` for its M-step (``(1, 1)``:
        flat); ``None`` (default) keeps ``delta`` fixed, as Deng et al. advise for deep networks,
        where a learnt ``delta`` can cascade to zero (many redundant weights each carry little
        likelihood, the E-step puts them in the spike, ``delta`` falls, and the threshold rises).
    :param sites: ``fnmatch`` patterns of the sparse sites (default: every site of 2 or more
        dimensions, i.e. weight matrices and filters, not biases).
    :param group: ``"weight"`` (one inclusion probability per weight) or ``"neuron"`` (per row
        ``w[o, ...]``: an output neuron of a linear layer, a filter of a convolution).
    :param target_sparsity: fraction ``S`` of the sparse sites' weights to prune, ranked by group
        mean-square magnitude across all sparse sites (``None``: no pruning).
    :param prune_start: first call of ``sample`` of the ramp of the sparsity up to ``S``
        (default: the second half of warm-up).
    :param prune_end: the call of ``sample`` at which the sparsity reaches ``S``.
    :param learn_slab_scale: M-step on the slab scale (off by default, also following Deng et al.'s
        advice for deep networks).
    :param learn_spike_scale: M-step on the spike scale (off by default).
    :param sa_c: ``c`` of the stochastic-approximation weights ``omega_k = c / (A + k)^alpha``.
    :param sa_A: their ``A``.
    :param sa_alpha: their ``alpha``.

    ``kernel.inclusion_probabilities()`` gives site -> per-weight ``P(gamma = 1 | data)`` (the SA
    average of the E-step along the chain); ``diagnostics()`` adds per-draw ``"sparsity"``
    (fraction of the sparse sites' weights that are exactly zero) and ``"inclusion_rate"`` (the
    mean ``delta``), which :func:`~pyro_subnet.to_inference_data` puts in ArviZ's
    ``sample_stats``.

    >>> import pyro, torch
    >>> from torch import nn
    >>> from pyro_subnet.nn import BayesianNet
    >>> pyro.set_rng_seed(0)
    >>> model = BayesianNet(nn.Linear(10, 1), likelihood="regression", noise_scale=0.5)
    >>> x = torch.randn(200, 10); y = 2 * x[:, 0] + 0.5 * torch.randn(200)
    >>> kernel = ps.infer.SpikeSlabSGHMC(model, friction=0.5, spike_scale=0.02)
    >>> mcmc = pyro.infer.MCMC(kernel, num_samples=300, warmup_steps=300, disable_progbar=True)
    >>> mcmc.run(x, y)
    >>> (kernel.inclusion_probabilities()["weight"][0, :3] > 0.5).tolist()
    [True, False, False]
    """

    per_draw_stats = {**SGHMC.per_draw_stats, "sparsity": "sparsity", "inclusion_rate": "inclusion_rate"}

    def __init__(self, model, step_size: Optional[float] = None, friction="auto", *, spike_scale: Optional[float] = None,
                 slab_scale: Optional[float] = None, inclusion_prior: Optional[float] = None,
                 inclusion_beta=None, sites: Optional[Sequence[str]] = None, group: str = "weight",
                 target_sparsity: Optional[float] = None, prune_start: Optional[int] = None,
                 prune_end: Optional[int] = None, learn_slab_scale: bool = False, learn_spike_scale: bool = False,
                 sa_c: float = 1.0, sa_A: float = 10.0, sa_alpha: float = 0.7, **sghmc_options):
        super().__init__(model, step_size, friction, **sghmc_options)
        # Given values, else (at setup) the model's own SpikeSlab prior's, else the defaults.
        self._given = {"spike_scale": spike_scale, "slab_scale": slab_scale, "inclusion_prob": inclusion_prior}
        for name, value in (("spike_scale", spike_scale), ("slab_scale", slab_scale)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}.")
        if spike_scale is not None and slab_scale is not None:
            self._check_scales(spike_scale, slab_scale, 0.5)
        if inclusion_prior is not None:
            self._check_scales(0.0, 1.0, inclusion_prior, check_scales=False)
        self.spike_scale, self.slab_scale, self.inclusion_prior = spike_scale, slab_scale, inclusion_prior
        if group not in ("weight", "neuron", "filter"):
            raise ValueError(f"group must be 'weight' or 'neuron' (alias 'filter'), got {group!r}.")
        self.group = "weight" if group == "weight" else "neuron"
        if target_sparsity is not None and not 0 <= target_sparsity < 1:
            raise ValueError(f"target_sparsity must lie in [0, 1), got {target_sparsity}.")
        self.target_sparsity = target_sparsity
        self.prune_start, self.prune_end = prune_start, prune_end
        self.inclusion_beta = None if inclusion_beta is None else tuple(float(v) for v in inclusion_beta)
        self.learn_slab_scale, self.learn_spike_scale = learn_slab_scale, learn_spike_scale
        self.sa_c, self.sa_A, self.sa_alpha = sa_c, sa_A, sa_alpha
        self.sites = sites
        self.sparse_sites = None      # the model's weight sites that the patterns name (at setup)
        self._em = None

    @staticmethod
    def _check_scales(spike, slab, inclusion, check_scales=True):
        if check_scales and not 0 < spike < slab:
            raise ValueError(f"Need 0 < spike_scale < slab_scale, got {spike} and {slab}.")
        if not 0 < inclusion < 1:
            raise ValueError(f"inclusion_prior must lie in (0, 1), got {inclusion}.")

    def _after_bridge(self):
        """The sparse sites among the model's weight sites, and the scales: as given, else the
        model's own SpikeSlab prior's (the first sparse site that has one), else 0.01, 1, 0.5."""
        bridge = self.bridge
        if bridge is None:
            raise ValueError("SpikeSlabSGHMC needs a Bayesian network model: a PyroModule (or BayesianNet) whose "
                             "weights are latent sites and whose likelihood is one observed site in a data plate.")
        layout = bridge.layout
        shapes = layout.shapes
        if self.sites is None:
            self.sparse_sites = [n for n in layout.names if len(shapes[n]) >= 2]
        else:
            self.sparse_sites = [n for n in layout.names if any(fnmatch.fnmatchcase(n, p) for p in self.sites)]
        if not self.sparse_sites:
            raise ValueError(f"No sparse sites: sites={self.sites!r} matches none of the weight sites {layout.names}.")
        own = next((bridge.site_prior(n) for n in self.sparse_sites
                    if isinstance(_base(bridge.site_prior(n)), SpikeSlab)), None) if bridge._static else None
        own = None if own is None else _base(own)
        for attr, default in (("spike_scale", 0.01), ("slab_scale", 1.0), ("inclusion_prob", 0.5)):
            value = self._given[attr]
            if value is None:
                value = float(getattr(own, attr).flatten()[0]) if own is not None else default
            setattr(self, "inclusion_prior" if attr == "inclusion_prob" else attr, float(value))
        self._check_scales(self.spike_scale, self.slab_scale, self.inclusion_prior)

    # --------------------------------------------------------------------------------------------
    def _reset(self):
        super()._reset()
        self._stats.update(sparsity=[], inclusion_rate=[])
        self._em = None
        self._kappa = None

    def setup(self, warmup_steps, *args, **kwargs):
        resuming = self._resume is not None
        super().setup(warmup_steps, *args, **kwargs)
        if resuming:      # _restore put the saved EM state and mask back; pruning is done
            self._prune_start = self._prune_end = 0
            return
        if self.target_sparsity and warmup_steps == 0 and self.prune_end is None:
            raise ValueError("Pruning happens during warm-up: give warmup_steps > 0 or prune_start/prune_end.")
        self._prune_start = self.prune_start if self.prune_start is not None else warmup_steps // 2
        self._prune_end = self.prune_end if self.prune_end is not None else warmup_steps
        ref = self.potential.x
        values = {n: v.to(ref) for n, v in self._initial.items()}
        rho, keep = {}, {}
        s1, s0 = self.slab_scale ** 2, self.spike_scale ** 2
        for n in self.sparse_sites:
            wg = _groups(values[n], self.group)
            # Start the EM from an E-step at the initial weights (a prior-mean start would
            # shrink every weight hard before the first E-step could rescue the large ones).
            rho[n] = e_step(wg.pow(2).sum(-1), wg.shape[1], self.inclusion_prior, s1, s0)
            keep[n] = torch.ones(wg.shape[0], dtype=torch.bool, device=ref.device)
        self._em = EMState(rho, {n: self.inclusion_prior for n in self.sparse_sites},
                           {n: s1 for n in self.sparse_sites}, {n: s0 for n in self.sparse_sites}, keep, 0)
        self._mask_flat = None
        self._kappa = None

    def _log_prior(self):
        return self._em_log_prior

    def _em_log_prior(self, theta: torch.Tensor) -> torch.Tensor:
        """The model's prior on the other weight sites + the expected complete-data log prior on
        the sparse ones, ``-1/2 sum_j kappa_j theta_j^2``, with ``kappa`` cached after each EM update
        (a zero-mean Normal prior of another site is folded into ``kappa`` too; any other prior is
        the site's own, from the bridge)."""
        if self._kappa is None:
            self._kappa = self._build_kappa(theta)
        lp = -0.5 * (self._kappa * theta * theta).sum()
        if self._other_sites:
            values = self.bridge.layout.unflatten(theta)
            for n in self._other_sites:
                lp = lp + self.bridge.site_log_prior(n, values[n])
        return lp

    def _prior_precision(self) -> Optional[torch.Tensor]:
        """The EM prior's precision per weight (``friction="auto"``'s floor; ``None`` before it is
        built or where a site keeps a prior that is not a fixed Normal)."""
        if self._kappa is None or self._other_sites:
            return None
        return self._kappa

    def _build_kappa(self, ref: torch.Tensor) -> torch.Tensor:
        em, parts, layout = self._em, {}, self.bridge.layout
        self._other_sites = []
        for n in layout.names:
            shape = layout.shapes[n]
            if n in em.rho:
                rho = em.rho[n]
                kappa = rho / em.slab_var[n] + (1 - rho) / em.spike_var[n]
                parts[n] = kappa[:, None].expand(-1, shape.numel() // rho.numel()).reshape(shape)
                continue
            normal = self.bridge.site_normal(n)
            if normal is not None and not normal[0].any():
                parts[n] = normal[1].pow(-2).to(ref)
            else:
                parts[n] = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
                self._other_sites.append(n)
        return layout.flatten(parts).detach()

    def _mask(self):
        if self._mask_flat is None:
            parts = {}
            for n in self.layout.names:
                shape = self.layout.shapes[n]
                if n in self._em.keep:
                    k = self._em.keep[n].to(self.potential.x.dtype)
                    parts[n] = (k[:, None].expand(-1, _groups(torch.empty(shape), self.group).shape[1])
                                .reshape(shape))
                else:
                    parts[n] = torch.ones(shape, dtype=self.potential.x.dtype, device=self.potential.x.device)
            self._mask_flat = self.layout.flatten(parts).to(self.potential.x)
        return self._mask_flat

    def _target(self) -> float:
        if not self.target_sparsity:
            return 0.0
        start, end = self._prune_start, self._prune_end
        p = 1.0 if self._t >= end else max(0.0, (self._t - start) / max(end - start, 1))
        return self.target_sparsity * (1 - (1 - p) ** 3)

    def _after_step(self, state):
        em = self._em
        k = em.count + 1
        omega = min(1.0, self.sa_c / (self.sa_A + k) ** self.sa_alpha)
        values = self.layout.unflatten(state.theta)
        rho, delta, slab, spike, keep = dict(em.rho), dict(em.delta), dict(em.slab_var), dict(em.spike_var), dict(em.keep)
        target = self._target()
        pruned_now = False
        sq_norms = {n: _groups(values[n].detach(), self.group).pow(2).sum(-1) for n in self.sparse_sites}
        # Pruning: zero the groups of least mean-square magnitude, over all sparse sites together
        # (the network decides which layers to thin), until the scheduled sparsity is reached.
        sizes = {n: self.layout.shapes[n].numel() // keep[n].numel() for n in self.sparse_sites}
        total = sum(keep[n].numel() * sizes[n] for n in self.sparse_sites)
        pruned = sum(int((~keep[n]).sum()) * sizes[n] for n in self.sparse_sites)
        if target * total > pruned + 0.5:
            score = torch.cat([torch.where(keep[n], sq_norms[n] / sizes[n], torch.full_like(sq_norms[n], -1.0))
                               for n in self.sparse_sites])
            weight = torch.cat([torch.full_like(sq_norms[n], float(sizes[n])) for n in self.sparse_sites])
            order = torch.argsort(score)
            cut = int(torch.searchsorted(torch.cumsum(weight[order], 0), torch.tensor(target * total + 1e-9,
                                         dtype=weight.dtype, device=weight.device), right=True))
            flat_keep = torch.ones_like(score, dtype=torch.bool)
            flat_keep[order[:cut]] = False
            offset = 0
            for n in self.sparse_sites:
                G = keep[n].numel()
                keep[n] = keep[n] & flat_keep[offset:offset + G]
                offset += G
            pruned_now = True
        for n in self.sparse_sites:
            sq = sq_norms[n]
            G, m = sq.numel(), sizes[n]
            r_new = e_step(sq, m, delta[n], slab[n], spike[n]) * keep[n]
            rho[n] = (1 - omega) * rho[n] + omega * r_new
            if self.inclusion_beta is not None:
                a, b = self.inclusion_beta
                d_new = (float(rho[n].sum()) + a - 1) / (G + a + b - 2)
                delta[n] = min(max((1 - omega) * delta[n] + omega * d_new, 1e-6), 1 - 1e-6)
            if self.learn_slab_scale:
                s0 = self.slab_scale ** 2   # inverse-gamma(1, 2 s0) hyper-prior: mode at the initial value
                s_new = (float((rho[n] * sq).sum()) + 2 * s0) / (float(rho[n].sum()) * m + 4)
                slab[n] = (1 - omega) * slab[n] + omega * max(s_new, 4 * spike[n])
            if self.learn_spike_scale:
                s0 = self.spike_scale ** 2
                s_new = (float(((1 - rho[n]) * sq * keep[n]).sum()) + 2 * s0) / (float(((1 - rho[n]) * keep[n]).sum()) * m + 4)
                spike[n] = (1 - omega) * spike[n] + omega * min(s_new, slab[n] / 4)
        self._em = EMState(rho, delta, slab, spike, keep, k)
        self._kappa = None
        if pruned_now:
            self._mask_flat = None
            state = state._replace(theta=state.theta * self._mask(), velocity=state.velocity * self._mask())
        return state

    def _record(self, eps, lp):
        super()._record(eps, lp)
        em = self._em
        total = sum(self.layout.shapes[n].numel() for n in self.sparse_sites)
        zeros = sum(float((~em.keep[n]).sum()) * (self.layout.shapes[n].numel() / em.keep[n].numel())
                    for n in self.sparse_sites)
        self._stats["sparsity"].append(zeros / total)
        self._stats["inclusion_rate"].append(sum(em.delta.values()) / len(em.delta))

    def inclusion_probabilities(self) -> Dict[str, torch.Tensor]:
        """Site -> ``P(gamma = 1 | data)`` per weight (the group's value for every weight of the
        group), from the last chain run in this process."""
        if self._em is None:
            raise RuntimeError("inclusion_probabilities(): run MCMC with this kernel first.")
        out = {}
        for n in self.sparse_sites:
            shape = self.layout.shapes[n]
            r = self._em.rho[n]
            m = shape.numel() // r.numel()
            out[n] = r[:, None].expand(-1, m).reshape(shape).clone()
        return out

    def state_dict(self):
        """:meth:`SGHMC.state_dict` plus the EM state: per sparse site the inclusion
        probabilities, inclusion rate, slab and spike variances and the pruning mask, and the
        stochastic-approximation step count."""
        out = super().state_dict()
        em = self._em
        out["em"] = {"rho": dict(em.rho), "delta": dict(em.delta), "slab_var": dict(em.slab_var),
                     "spike_var": dict(em.spike_var), "keep": dict(em.keep), "count": em.count}
        return out

    def _restore(self, state):
        super()._restore(state)
        if "em" not in state:
            raise ValueError("SpikeSlabSGHMC.load_state_dict: the state has no EM part (was it saved from an SGHMC "
                             "kernel?).")
        em, ref = state["em"], self.potential.x
        if sorted(em["rho"]) != sorted(self.sparse_sites):
            raise ValueError(f"SpikeSlabSGHMC.load_state_dict: the saved sparse sites {sorted(em['rho'])} differ from "
                             f"this kernel's {sorted(self.sparse_sites)}.")
        self._em = EMState({n: v.to(ref) for n, v in em["rho"].items()}, dict(em["delta"]), dict(em["slab_var"]),
                           dict(em["spike_var"]), {n: v.to(ref.device) for n, v in em["keep"].items()},
                           int(em["count"]))
        self._mask_flat = None
        self._kappa = None
