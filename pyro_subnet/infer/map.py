"""Maximum a posteriori weights of a Bayesian network (any model :class:`~pyro_subnet.nn.ModelBridge` accepts).

.. math::

    \\hat\\theta = \\arg\\max_\\theta \\; \\log p(\\theta) + \\sum_{n=1}^N \\log p(y_n \\mid f(x_n; \\theta)),

found with Adam on mini-batches, the data term scaled by ``N / B`` so every step is an unbiased
estimate of the full objective (divided by ``N`` so that learning rates do not depend on ``N``).
Under ``torch.distributed`` each rank draws its mini-batches from its own shard and the gradients
are averaged over ranks before every step.
This is the first step of every Laplace method, and a sensible start for the samplers.

A learned noise scale is fitted jointly, :math:`(\\hat\\theta, \\hat\\sigma) = \\arg\\max \\log
p(\\theta) + \\log p(\\sigma) + \\sum_n \\log \\mathcal{N}(y_n; f(x_n;\\theta), \\sigma^2)` (Adam on
:math:`\\log\\sigma`), where :math:`p(\\sigma)` is the prior of the model's noise site (e.g.
``sigma = pyro.sample("sigma", dist.HalfNormal(1.))``), or flat for a noise hyperparameter
(``BayesianNet(noise_scale=None)``), after a warm-up with the noise held small (``noise_warmup``
of :func:`fit_map`: from a large noise the fit can settle in a mode that calls the signal noise).
The likelihood keeps :math:`\\hat\\sigma`
(``bridge.likelihood.noise_scale``, also returned): the starting point that the Laplace guides
refine by the evidence and the samplers sample or refine by EM.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from tqdm.auto import trange

from ..data.batches import iter_batches
from ..nn.bridge import as_bridge
from ..nn.validation import check_positive_int
from . import distributed


#: The held noise scale of :func:`fit_map`'s warm-up, as a fraction of the targets' standard deviation.
NOISE_WARMUP_SCALE = 0.1


class MAPResult(NamedTuple):
    theta: torch.Tensor                # (D,) MAP weights (unconstrained, in bridge.layout order)
    losses: torch.Tensor               # (num_steps,) negative log joint per datum along the run
    noise_scale: Optional[float] = None   # the fitted noise scale of a learned-noise regression


def neg_log_joint(bridge, theta, x, y, num_data: int, noise_scale=None) -> torch.Tensor:
    """``-(N/B) sum_b log p(y_b | theta) - log p(theta)`` for a batch ``(x, y)`` of ``B`` examples
    (``noise_scale``: a differentiable Gaussian noise scale replacing the likelihood's own)."""
    if noise_scale is None:
        log_lik = bridge.log_likelihood(theta, x, y).sum()
    else:
        log_lik = bridge.likelihood.distribution(bridge.network.flat(theta, x), noise_scale=noise_scale).log_prob(y).sum()
    return -(num_data / x.shape[0]) * log_lik - bridge.log_prior(theta)


def residual_sum_of_squares(fnet, theta: torch.Tensor, data, batch_size: int = 256) -> float:
    """:math:`\\mathrm{SSE} = \\sum_n \\lVert y_n - f(x_n, \\theta) \\rVert^2` of a regression network over
    ``data`` (tensors ``(x, y)`` or a DataLoader), batch by batch, the network in evaluation mode: what
    the noise updates of the MAP and of the Laplace guides need."""
    total = 0.0
    with torch.no_grad():
        for xb, yb in iter_batches(data, batch_size, device=theta.device):
            f = fnet.flat(theta, xb)
            total += float((f.reshape(len(yb), -1) - yb.reshape(len(yb), -1)).pow(2).sum())
    return total


def residual_scale(bridge, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, chunk: int) -> float:
    """The noise scale that maximises the Gaussian likelihood at fixed weights,
    :math:`\\hat\\sigma = (\\mathrm{SSE} / (N K))^{1/2}` (:func:`residual_sum_of_squares`), over the
    data of every rank (in ``chunk``-sized passes, the network in evaluation mode)."""
    sse = residual_sum_of_squares(bridge.network, theta, (x, y), chunk)
    totals = torch.tensor([sse, float(y.numel())], dtype=torch.float64, device=x.device)
    distributed.all_reduce_mean(totals)     # the ratio of the means is the ratio of the sums
    return max(float((totals[0] / totals[1]).sqrt()), torch.finfo(x.dtype).eps)   # > 0 even on an exact fit


def fit_map(model, x, y, num_steps: int = 2000, lr: float = 1e-2, batch_size: Optional[int] = 256,
            init: Optional[torch.Tensor] = None,
            progress: bool = True, seed: Optional[int] = None, fit_noise: bool = True,
            noise_warmup: float = 0.25) -> MAPResult:
    """Find the MAP weights of ``model`` on ``(x, y)``.

    :param model: a Pyro model (see :class:`~pyro_subnet.nn.ModelBridge`) or its bridge; a learned
        noise scale is written to the bridge's likelihood.
    :param num_steps: Adam steps (each on one mini-batch).
    :param lr: Adam learning rate.
    :param batch_size: mini-batch size (``None``: full batch).
    :param init: starting weights ``(D,)`` (default: the wrapped network's own weights).
    :param progress: show a progress bar with the loss.
    :param seed: seed for the mini-batch order.
    :param fit_noise: fit a learned noise scale jointly (default); ``False`` holds it at the
        likelihood's current value (the evidence framework sets it by the evidence instead).
    :param noise_warmup: with ``fit_noise``, the fraction of the steps taken first with the noise
        held at a small scale, ``min(current, NOISE_WARMUP_SCALE * std(y))``, before it is fitted
        jointly, starting from the scale of the residuals then (:func:`residual_scale`). The joint
        objective has a second mode where a large noise explains the data and the weights stay
        near the prior (the data's gradients scale as :math:`\\sigma^{-2}`, so the prior wins);
        Adam from a noise of the targets' size falls into it and stays. From a held small noise
        the weights fit the data first, and freeing the noise only relaxes them; where they could
        not fit it in the warm-up, the residuals' scale says so (``docs/measured.md``). ``0``:
        joint from the start.
    :returns: :class:`MAPResult` with the weights and the loss curve.

    >>> from torch import nn
    >>> from pyro_subnet.nn import BayesianNet
    >>> pyro.set_rng_seed(0)
    >>> model = BayesianNet(nn.Linear(2, 1), likelihood="regression", noise_scale=0.1)
    >>> x = torch.randn(50, 2); y = x @ torch.tensor([1.0, -2.0])
    >>> ps.infer.fit_map(model, x, y, num_steps=500, lr=0.05, progress=False).theta[:2].round(decimals=1)
    tensor([ 1., -2.])
    """
    bridge = as_bridge(model, x)
    x, y = bridge.check(x, y)
    check_positive_int(num_steps, "num_steps")
    batch_size = check_positive_int(batch_size, "batch_size", allow_none=True)
    n = x.shape[0]
    if not (isinstance(noise_warmup, (int, float)) and 0 <= noise_warmup < 1):
        raise ValueError(f"fit_map: noise_warmup must be a fraction in [0, 1), got {noise_warmup!r}.")
    # Under torch.distributed every rank passes the whole data set and works on its shard; the
    # gradients are averaged (as DistributedDataParallel does), so all ranks take the same steps.
    local = distributed.shard(n)
    held_noise = min(float(bridge.likelihood.noise_scale), NOISE_WARMUP_SCALE * float(y.std())) \
        if getattr(bridge.likelihood, "learn_noise", False) and n > 1 else None   # the whole y: the same on every rank
    x, y = x[local], y[local]
    n_local = x.shape[0]
    theta0 = bridge.initial_theta(dtype=x.dtype, device=x.device) if init is None else init.to(x)
    theta = theta0.detach().clone().requires_grad_(True)
    params = [theta]
    noise_is_learned = getattr(bridge.likelihood, "learn_noise", False)   # a hyperparameter, not a fixed value
    fits_noise = noise_is_learned and fit_noise                            # ... and this run fits it
    warmup_steps = int(noise_warmup * num_steps) if fits_noise and held_noise else 0
    if fits_noise:
        start = held_noise if warmup_steps else bridge.likelihood.noise_scale
        log_noise = torch.tensor(math.log(start), dtype=x.dtype, device=x.device).requires_grad_(True)
        params.append(log_noise)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(torch.initial_seed() if seed is None else seed)
    b = n_local if batch_size is None or batch_size >= n_local else batch_size
    perm, pos = torch.randperm(n_local, generator=gen), 0
    losses = torch.empty(num_steps)
    bar = trange(num_steps, desc="MAP", disable=not progress, leave=False)
    noise_prior = fits_noise and bridge.noise_site is not None   # the noise site's own prior joins the objective
    for step in bar:
        if step == warmup_steps and warmup_steps:
            # The held noise has done its job (the weights fit the data); the joint fit starts
            # from the noise those weights imply, sqrt(mean squared residual), since Adam on
            # log sigma would take many steps to get there from the held value.
            log_noise.data.fill_(math.log(residual_scale(bridge, theta.detach(), x, y, b)))
            # The data term's scale drops by (held / new noise)^2; Adam's second moments, which
            # remember the warm-up for about 1 / (1 - beta2) steps, would shrink every step by it.
            opt = torch.optim.Adam(params, lr=lr)
        with bridge.network.training():    # Dropout on; BatchNorm learns its running statistics
            if b < n_local:
                if pos + b > n_local:
                    perm, pos = torch.randperm(n_local, generator=gen), 0
                idx = perm[pos:pos + b].to(x.device)
                pos += b
                xb, yb = x[idx], y[idx]
            else:
                xb, yb = x, y
            if fits_noise:     # held (no gradient, so Adam leaves it) during the warm-up
                log_s = log_noise if step >= warmup_steps else log_noise.detach()
            loss = neg_log_joint(bridge, theta, xb, yb, n, log_s.exp() if fits_noise else None)
            if noise_prior:
                loss = loss - (bridge.noise_log_prior(log_s) - log_s)   # log p(sigma), no Jacobian
            loss = loss / n
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for param in params:
                if param.grad is not None:
                    distributed.all_reduce_mean(param.grad)
            opt.step()
            losses[step] = loss.detach()
            if progress and step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    if not torch.isfinite(theta).all():
        raise RuntimeError("fit_map: the weights became NaN or infinite; lower lr.")
    if fits_noise:
        bridge.likelihood.set_noise_scale(float(log_noise.detach().exp()))
    if noise_is_learned:
        return MAPResult(theta.detach(), losses, bridge.likelihood.noise_scale)
    return MAPResult(theta.detach(), losses)
