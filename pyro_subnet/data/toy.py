"""Generated toy problems: in-between uncertainty in 1D, and two moons."""

from __future__ import annotations

import math

import torch

from .datasets import Dataset


def gap_regression(n: int = 100, noise: float = 0.1, seed: int = 0, dtype=torch.float32,
                   num_test: int = 200) -> Dataset:
    """1D regression with a gap between two clusters of inputs (Foong et al., 2019).

    Inputs are uniform on ``[-2, -1] U [1, 2]`` (half in each cluster), targets
    ``y = sin(3x) + 0.3 x + noise * eps``. The test inputs are a grid on ``[-3, 3]``, so the
    predictive uncertainty inside the gap ``(-1, 1)`` and outside the data can be read off.
    """
    g = torch.Generator().manual_seed(seed)
    half = n // 2
    x = torch.cat([torch.rand(half, generator=g) - 2.0, torch.rand(n - half, generator=g) + 1.0])
    f = lambda t: torch.sin(3 * t) + 0.3 * t
    y = f(x) + noise * torch.randn(n, generator=g)
    xt = torch.linspace(-3, 3, num_test)
    return Dataset("gap_regression", x[:, None].to(dtype), y.to(dtype), xt[:, None].to(dtype),
                   f(xt).to(dtype), "regression", 1)


def two_moons(n: int = 200, noise: float = 0.1, seed: int = 0, dtype=torch.float32,
              test_fraction: float = 0.3) -> Dataset:
    """Two interleaving half circles, 2 classes (the classic ``make_moons``, generated here)."""
    g = torch.Generator().manual_seed(seed)
    n0 = n // 2
    t0 = math.pi * torch.rand(n0, generator=g)
    t1 = math.pi * torch.rand(n - n0, generator=g)
    x0 = torch.stack([torch.cos(t0), torch.sin(t0)], 1)
    x1 = torch.stack([1 - torch.cos(t1), 0.5 - torch.sin(t1)], 1)
    x = torch.cat([x0, x1]) + noise * torch.randn(n, 2, generator=g)
    y = torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n - n0, dtype=torch.long)])
    perm = torch.randperm(n, generator=g)
    x, y = x[perm], y[perm]
    n_test = int(round(test_fraction * n))
    return Dataset("two_moons", x[n_test:].to(dtype), y[n_test:], x[:n_test].to(dtype), y[:n_test],
                   "classification", 2)
