"""The spike-and-slab prior: a two-component zero-mean Gaussian mixture per weight."""

from __future__ import annotations

import math
from numbers import Number

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all


class SpikeSlab(TorchDistribution):
    """Spike-and-slab prior (Ročková & George 2014; the Gaussian form of Deng et al., 2019 and
    Ke & Fan, 2022):

    .. math::

        p(w) = \\pi\\, \\mathcal{N}(w; 0, \\sigma_1^2) + (1 - \\pi)\\, \\mathcal{N}(w; 0, \\sigma_0^2),
        \\qquad \\sigma_0 \\ll \\sigma_1,

    i.e. ``w | gamma ~ N(0, sigma_1^2)`` if ``gamma = 1`` (slab, the weight matters) and
    ``N(0, sigma_0^2)`` otherwise (spike, the weight is close to zero), ``gamma ~ Bernoulli(pi)``.
    The posterior inclusion probability of one weight (the E-step of EM variable selection) is

    .. math::

        \\rho(w) = P(\\gamma = 1 \\mid w) = \\sigma\\Big(\\operatorname{logit}\\pi
            + \\log\\frac{\\sigma_0}{\\sigma_1} + \\frac{w^2}{2}\\Big(\\frac{1}{\\sigma_0^2}
            - \\frac{1}{\\sigma_1^2}\\Big)\\Big),

    see :meth:`inclusion_probability`; the gradient of ``log p`` is
    ``-w (rho / sigma_1^2 + (1 - rho) / sigma_0^2)``: an adaptive per-weight weight decay.

    Usable in any Pyro model, and as ``BayesianNet(net, prior=SpikeSlab(...))`` (a scalar
    distribution is expanded to every weight site).

    :param spike_scale: standard deviation ``sigma_0`` of the spike (positive).
    :param slab_scale: standard deviation ``sigma_1`` of the slab (positive).
    :param inclusion_prob: prior probability ``pi`` in ``(0, 1)`` of the slab.

    >>> d = ps.distributions.SpikeSlab(0.01, 1.0, 0.5)
    >>> float(d.log_prob(torch.tensor(0.0))) > float(d.log_prob(torch.tensor(1.0)))
    True
    >>> d.inclusion_probability(torch.tensor([0.0, 1.0])).round(decimals=2)
    tensor([0.0100, 1.0000])
    """

    arg_constraints = {"spike_scale": constraints.positive, "slab_scale": constraints.positive,
                       "inclusion_prob": constraints.unit_interval}
    support = constraints.real
    has_rsample = False

    def __init__(self, spike_scale, slab_scale, inclusion_prob, validate_args=None):
        for name, v in (("spike_scale", spike_scale), ("slab_scale", slab_scale)):
            if isinstance(v, Number) and not v > 0:
                raise ValueError(f"SpikeSlab: {name} must be positive, got {v!r}.")
        if isinstance(inclusion_prob, Number) and not 0 < inclusion_prob < 1:
            raise ValueError(f"SpikeSlab: inclusion_prob must lie in (0, 1), got {inclusion_prob!r}.")
        self.spike_scale, self.slab_scale, self.inclusion_prob = broadcast_all(spike_scale, slab_scale,
                                                                               inclusion_prob)
        super().__init__(self.spike_scale.shape, torch.Size(), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(SpikeSlab, _instance)
        batch_shape = torch.Size(batch_shape)
        new.spike_scale = self.spike_scale.expand(batch_shape)
        new.slab_scale = self.slab_scale.expand(batch_shape)
        new.inclusion_prob = self.inclusion_prob.expand(batch_shape)
        super(SpikeSlab, new).__init__(batch_shape, torch.Size(), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _component_log_probs(self, value):
        half_log_2pi = 0.5 * math.log(2 * math.pi)
        slab = (-0.5 * (value / self.slab_scale) ** 2 - self.slab_scale.log() - half_log_2pi
                + self.inclusion_prob.log())
        spike = (-0.5 * (value / self.spike_scale) ** 2 - self.spike_scale.log() - half_log_2pi
                 + torch.log1p(-self.inclusion_prob))
        return slab, spike

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        slab, spike = self._component_log_probs(value)
        return torch.logaddexp(slab, spike)

    def inclusion_probability(self, value):
        """``P(gamma = 1 | w = value)``: the posterior probability that ``value`` is from the slab."""
        slab, spike = self._component_log_probs(value)
        return torch.sigmoid(slab - spike)

    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            gamma = torch.bernoulli(self.inclusion_prob.expand(shape))
            scale = torch.where(gamma > 0, self.slab_scale.expand(shape), self.spike_scale.expand(shape))
            return scale * torch.randn(shape, dtype=scale.dtype, device=scale.device)

    @property
    def mean(self):
        return torch.zeros_like(self.spike_scale)

    @property
    def variance(self):
        p = self.inclusion_prob
        return p * self.slab_scale ** 2 + (1 - p) * self.spike_scale ** 2

    def __repr__(self):
        return (f"SpikeSlab(spike_scale: {self.spike_scale}, slab_scale: {self.slab_scale}, "
                f"inclusion_prob: {self.inclusion_prob})")
