"""Mini-batch potentials ``U(theta)`` and their gradients, on one flat unconstrained vector.

Pyro's ``initialize_model`` refuses models whose data plate subsamples, so the SG kernels set up
the model themselves. Two routes:

* :class:`NetPotential` for any model the :class:`~pyro_subnet.nn.ModelBridge` reads (a Bayesian
  network with one observed site in a data plate): ``U = -(N/B) sum_{n in batch} log p(y_n |
  theta) - log p(theta)`` through the bridge's network function, on batches drawn by the kernel (a
  fresh permutation every epoch, so every example is used once per epoch);
* :class:`TracePotential` for any other Pyro model: ``U = -log p(x, theta)`` from
  ``trace(condition(model, theta))`` (the model's own ``pyro.plate(..., subsample_size=B)`` draws
  fresh indices and scales by ``N/B`` on every call), minus the log-Jacobians of the transforms to
  the unconstrained space, exactly like Pyro's ``_PEMaker`` but allowing subsampling.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide.initialization import InitMessenger, init_to_sample
from pyro.poutine.util import site_is_subsample

from ...nn import SiteLayout


class NetPotential:
    """``U`` of a model through its :class:`~pyro_subnet.nn.ModelBridge`, on kernel-drawn
    mini-batches.

    :param bridge: the model's bridge.
    :param x: the full training inputs.
    :param y: the full training targets.
    :param batch_size: mini-batch size ``B`` (``None`` or ``>= N``: full batch).
    :param log_prior: ``theta (D,) -> log p(theta)`` of the weight sites (default: the model's
        own prior); the spike-and-slab kernel injects its EM prior here.
    :param sample_noise: the model's noise site is one more coordinate, ``log sigma``, last in
        ``theta``, with the site's own prior (:meth:`~pyro_subnet.nn.ModelBridge.noise_log_prior`).
    """

    def __init__(self, bridge, x, y, batch_size: Optional[int] = None,
                 log_prior: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, sample_noise: bool = False):
        self.bridge = bridge
        self.x, self.y = bridge.check(x, y)
        if self.y is None:
            raise ValueError("SGHMC needs the observations: call mcmc.run(x, y).")
        self.num_data = self.x.shape[0]
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"subsample_size must be a positive integer or None, got {batch_size!r}.")
        self.batch_size = self.num_data if batch_size is None else min(batch_size, self.num_data)
        self.log_prior = bridge.log_prior if log_prior is None else log_prior
        self.network, self.likelihood = bridge.network, bridge.likelihood
        self.num_weights = bridge.layout.dim
        self.sample_noise = sample_noise
        self._perm, self._pos = None, self.num_data
        self.last_mse = None      # mean squared residual of the last batch (regression)
        self.estimate_noise = False      # also estimate the gradient noise (the step-size adaptation's)
        self.last_grad_noise = None      # (D,) that estimate for the last batch

    def _next_batch(self):
        if self.batch_size >= self.num_data:
            return self.x, self.y
        if self._pos + self.batch_size > self.num_data:
            self._perm, self._pos = torch.randperm(self.num_data, device=self.x.device), 0
        idx = self._perm[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.x.index_select(0, idx), self.y.index_select(0, idx)

    def batch_order(self):
        """Where the mini-batch stream stands: ``(permutation of this epoch, position)``."""
        return self._perm, self._pos

    def set_batch_order(self, order) -> None:
        perm, pos = order
        self._perm = None if perm is None else perm.to(self.x.device)
        self._pos = int(pos)

    def _log_joint_terms(self, theta: torch.Tensor, xb, yb, pointwise: bool):
        """``(log-likelihood, log prior, f)`` on a batch: the likelihood summed, or per example;
        ``f`` the network's output."""
        w = theta[:self.num_weights] if self.sample_noise else theta
        # One weight vector: the unbatched network call (no vmap) is the fast path.
        f = self.network.flat(w, xb)
        if self.sample_noise:
            log_noise = theta[self.num_weights]
            lp = self.likelihood.distribution(f, noise_scale=log_noise.exp()).log_prob(yb)
            log_lik = lp.reshape(len(yb), -1).sum(1) if pointwise else lp.sum()
            log_prior = self.log_prior(w) + self.bridge.noise_log_prior(log_noise)
        else:
            log_lik = (self.likelihood.log_prob(f, yb).reshape(len(yb), -1).sum(1) if pointwise
                       else self.likelihood.log_prob_sum(f, yb))
            log_prior = self.log_prior(w)
        return log_lik, log_prior, f

    def __call__(self, theta: torch.Tensor) -> Tuple[float, torch.Tensor]:
        """``(U, grad U)`` on the next mini-batch. With :attr:`estimate_noise` (and a batch of at
        least two, smaller than the data) also :attr:`last_grad_noise`, ``(g_1 - g_2)^2 / 4`` for
        the gradients ``g_1, g_2`` of the batch's two halves, each scaled to the full data: an
        unbiased estimate of the variance of ``grad U`` per coordinate (the prior cancels)."""
        xb, yb = self._next_batch()
        b = xb.shape[0]
        split = self.estimate_noise and 2 <= b < self.num_data
        theta = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            log_lik, log_prior, f = self._log_joint_terms(theta, xb, yb, pointwise=split)
            if self.likelihood.name == "regression":
                # Kept for the samplers' EM update of a noise hyperparameter.
                r = f.detach().reshape(len(yb), -1) - yb.reshape(len(yb), -1)
                self.last_mse = float(r.pow(2).mean())
            if split:
                half = b // 2
                # sum_{first half} - half/(b - half) * sum_{second half}: zero mean, and its gradient
                # times N/half is g_1 - g_2 with g_i the half-batch gradients scaled to N.
                sign = torch.full((b,), -half / (b - half), dtype=log_lik.dtype, device=log_lik.device)
                sign[:half] = 1.0
                contrast = (log_lik * sign).sum()
                log_lik = log_lik.sum()
            u = -(self.num_data / b) * log_lik - log_prior
            if split:
                (grad,) = torch.autograd.grad(u, theta, retain_graph=True)
                (d,) = torch.autograd.grad(contrast, theta)
                self.last_grad_noise = (self.num_data / half * d).pow(2) / 4
            else:
                (grad,) = torch.autograd.grad(u, theta)
                self.last_grad_noise = None if b < self.num_data else torch.zeros_like(grad)
        return float(u.detach()), grad

    def hvp(self, theta: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """``H v`` of the potential on the next mini-batch (double backward)."""
        xb, yb = self._next_batch()
        theta = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            log_lik, log_prior, _ = self._log_joint_terms(theta, xb, yb, pointwise=False)
            u = -(self.num_data / xb.shape[0]) * log_lik - log_prior
            (grad,) = torch.autograd.grad(u, theta, create_graph=True)
            (hv,) = torch.autograd.grad(grad, theta, grad_outputs=vector)
        return hv.detach()


def setup_trace_model(model, args, kwargs, init_strategy=init_to_sample):
    """Initial unconstrained values, transforms and layout of a generic Pyro model's latent sites
    (subsample sites skipped, so subsampled plates are fine)."""
    with poutine.block():
        trace = poutine.trace(InitMessenger(init_strategy)(model)).get_trace(*args, **kwargs)
    transforms, init = {}, {}
    for name, site in trace.iter_stochastic_nodes():
        if site_is_subsample(site):
            continue
        if site["fn"].support.is_discrete:
            raise NotImplementedError(f"SGHMC needs continuous latent sites; {name!r} is discrete.")
        transforms[name] = biject_to(site["fn"].support).inv
        init[name] = transforms[name](site["value"]).detach()
    layout = SiteLayout([(n, v.shape) for n, v in init.items()])
    return init, transforms, layout


class TracePotential:
    """``U`` of any Pyro model with continuous latent sites, its own subsampling included."""

    def __init__(self, model, args, kwargs, transforms: Dict, layout: SiteLayout):
        self.model, self.args, self.kwargs = model, args, kwargs
        self.transforms, self.layout = transforms, layout

    estimate_noise = False      # the model draws its own batches: no half-batch noise estimate
    last_grad_noise = None

    def _log_joint(self, theta: torch.Tensor) -> torch.Tensor:
        unconstrained = self.layout.unflatten(theta)
        constrained = {k: self.transforms[k].inv(v) for k, v in unconstrained.items()}
        with poutine.block():
            trace = poutine.trace(poutine.condition(self.model, constrained)).get_trace(*self.args, **self.kwargs)
        log_joint = trace.log_prob_sum()
        for k, t in self.transforms.items():
            log_joint = log_joint - t.log_abs_det_jacobian(constrained[k], unconstrained[k]).sum()
        return log_joint

    def __call__(self, theta: torch.Tensor) -> Tuple[float, torch.Tensor]:
        theta = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            log_joint = self._log_joint(theta)
            (grad,) = torch.autograd.grad(-log_joint, theta)
        return float(-log_joint.detach()), grad

    def hvp(self, theta: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """``H v`` of the potential (the model's own batch; double backward)."""
        theta = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(-self._log_joint(theta), theta, create_graph=True)
            (hv,) = torch.autograd.grad(grad, theta, grad_outputs=vector)
        return hv.detach()
