"""Embedded data sets: scikit-learn's bundled tables, standardised, with fixed splits.

Nothing is downloaded: the data ship inside scikit-learn. Inputs are standardised with the
training split's mean and standard deviation (regression targets too, with the scale kept so
that metrics can be reported in the original units).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np
import torch


@dataclass
class Dataset:
    """A train/test split as tensors."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    likelihood: str                 # "classification" or "regression"
    num_outputs: int                # classes, or 1 for regression
    y_mean: float = 0.0             # regression: y_original = y * y_std + y_mean
    y_std: float = 1.0
    x_mean: Optional[torch.Tensor] = None   # x_original = x * x_std + x_mean (per feature)
    x_std: Optional[torch.Tensor] = None

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
                f"{self.likelihood}, outputs={self.num_outputs})")


def _split(n: int, test_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_test = int(round(test_fraction * n))
    return perm[n_test:], perm[:n_test]


def _make(name, X, y, likelihood, test_fraction, seed, dtype) -> Dataset:
    X = np.asarray(X, dtype=np.float64)
    tr, te = _split(len(X), test_fraction, seed)
    mu, sd = X[tr].mean(0), X[tr].std(0)
    sd[sd == 0] = 1.0  # constant pixels in digits
    Xs = (X - mu) / sd
    stats = dict(x_mean=torch.as_tensor(mu, dtype=dtype), x_std=torch.as_tensor(sd, dtype=dtype))
    if likelihood == "classification":
        y = np.asarray(y, dtype=np.int64)
        yt = torch.as_tensor(y)
        return Dataset(name, torch.as_tensor(Xs[tr], dtype=dtype), yt[tr], torch.as_tensor(Xs[te], dtype=dtype),
                       yt[te], likelihood, int(y.max()) + 1, **stats)
    y = np.asarray(y, dtype=np.float64)
    ym, ys = float(y[tr].mean()), float(y[tr].std())
    ysd = (y - ym) / ys
    return Dataset(name, torch.as_tensor(Xs[tr], dtype=dtype), torch.as_tensor(ysd[tr], dtype=dtype),
                   torch.as_tensor(Xs[te], dtype=dtype), torch.as_tensor(ysd[te], dtype=dtype),
                   likelihood, 1, ym, ys, **stats)


def load_digits(test_fraction: float = 0.3, seed: int = 0, dtype=torch.float32) -> Dataset:
    """8x8 handwritten digits (1,797 images, 64 features, 10 classes)."""
    from sklearn.datasets import load_digits as _load
    d = _load()
    return _make("digits", d.data, d.target, "classification", test_fraction, seed, dtype)


def load_breast_cancer(test_fraction: float = 0.3, seed: int = 0, dtype=torch.float32) -> Dataset:
    """Wisconsin breast cancer (569 examples, 30 features, 2 classes)."""
    from sklearn.datasets import load_breast_cancer as _load
    d = _load()
    return _make("breast_cancer", d.data, d.target, "classification", test_fraction, seed, dtype)


def load_wine(test_fraction: float = 0.3, seed: int = 0, dtype=torch.float32) -> Dataset:
    """Wine cultivars (178 examples, 13 features, 3 classes)."""
    from sklearn.datasets import load_wine as _load
    d = _load()
    return _make("wine", d.data, d.target, "classification", test_fraction, seed, dtype)


def load_diabetes(test_fraction: float = 0.3, seed: int = 0, dtype=torch.float32) -> Dataset:
    """Diabetes progression (442 examples, 10 features, regression)."""
    from sklearn.datasets import load_diabetes as _load
    d = _load()
    return _make("diabetes", d.data, d.target, "regression", test_fraction, seed, dtype)


LOADERS: Dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "breast_cancer": load_breast_cancer,
    "wine": load_wine,
    "diabetes": load_diabetes,
}


def load(name: str, **kwargs) -> Dataset:
    """Load an embedded data set by name (``ps.data.LOADERS`` lists them)."""
    if name not in LOADERS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(LOADERS)}.")
    return LOADERS[name](**kwargs)
