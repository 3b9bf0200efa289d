"""Diagonal SWAG marginal variances (Maddox et al., NeurIPS 2019), the variances the
subnetwork-inference paper ranks weights by.

From the MAP, run SGD with momentum on the mean negative log joint and take one snapshot of the
weights per epoch; the variances are :math:`\\overline{\\theta^2} - \\bar\\theta^2` over the
snapshots. Weights the loss surface leaves free wander more and get larger variances; unlike
diagonal-Laplace variances these also reflect how the weights move together with the others.
"""

from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import trange

from ...map import neg_log_joint
from ...randomness import resolve_seed


def swag_diagonal_variance(model, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                           num_snapshots: int = 40, lr: float = 1e-2, momentum: float = 0.9,
                           batch_size: int = 128, seed: Optional[int] = None, progress: bool = False,
                           max_retries: int = 4) -> torch.Tensor:
    """Marginal SWAG variances ``(D,)`` around ``theta``.

    :param num_snapshots: epochs of SGD, one snapshot at the end of each.
    :param lr: SGD learning rate on the loss per datum. If SGD diverges (a sharp likelihood,
        e.g. small regression noise), it restarts with ``lr / 10``, up to ``max_retries`` times.
    :param momentum: SGD momentum.
    :param batch_size: mini-batch size.
    :param seed: seed of the mini-batch order (``None``: drawn from torch's global generator, so
        ``pyro.set_rng_seed`` governs it).

    :param model: the model's :class:`~pyro_subnet.nn.ModelBridge`.
    :param theta: the flat MAP weights ``(D,)`` the snapshots start from.

    >>> from pyro_subnet.infer import fit_map
    >>> from pyro_subnet.nn import BayesianNet, as_bridge
    >>> pyro.set_rng_seed(0)
    >>> x = torch.randn(64, 2); y = x @ torch.tensor([1.0, -1.0]) + 0.1 * torch.randn(64)
    >>> bridge = as_bridge(BayesianNet(nn.Linear(2, 1), "regression", noise_scale=0.1), x)
    >>> theta_map = fit_map(bridge, x, y, num_steps=200, lr=0.05, progress=False).theta
    >>> var = ps.subnet.swag_diagonal_variance(bridge, theta_map, x, y, num_snapshots=10, batch_size=16)
    >>> var.shape, bool((var > 0).all())
    (torch.Size([3]), True)
    """
    seed = resolve_seed(seed, shared=False)      # one seed for every retry
    for _ in range(max_retries + 1):
        var = _swag(model, theta, x, y, num_snapshots, lr, momentum, batch_size, seed, progress)
        if var is not None:
            return var
        lr = lr / 10
    raise RuntimeError(f"SWAG diverged even at lr={lr * 10:.1e}; pass a smaller lr= to the strategy.")


def _swag(model, theta, x, y, num_snapshots, lr, momentum, batch_size, seed, progress):
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    t = theta.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([t], lr=lr, momentum=momentum)
    mean = torch.zeros_like(theta)
    sq = torch.zeros_like(theta)
    b = min(batch_size, n)
    for _ in trange(num_snapshots, desc="SWAG", disable=not progress, leave=False):
        perm = torch.randperm(n, generator=gen).to(x.device)
        for s in range(0, n - b + 1, b):
            idx = perm[s:s + b]
            loss = neg_log_joint(model, t, x[idx], y[idx], n) / n
            if not torch.isfinite(loss):
                return None
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if not torch.isfinite(t).all():
            return None
        with torch.no_grad():
            mean += t / num_snapshots
            sq += t ** 2 / num_snapshots
    return (sq - mean ** 2).clamp_min(0.0)
