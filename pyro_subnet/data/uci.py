"""The UCI regression benchmark with the standard 20 splits (Hernandez-Lobato & Adams, 2015).

The data ship inside the package (``pyro_subnet/data/uci_splits/``: one zip per set holding the
files of Gal & Ghahramani's distribution unchanged, with its LICENSE and a README that gives the
provenance and the published results). Nothing is downloaded and nothing outside the installed
package is read. Inputs and targets are standardised with the training split's statistics;
``Dataset.y_mean``/``y_std`` map predictions back to the original units, in which the published
test log-likelihoods and RMSEs are reported.
"""

from __future__ import annotations

import functools
import io
import zipfile
from importlib import resources
from typing import Dict

import numpy as np
import torch

from .datasets import Dataset

UCI_FOLDERS = {"boston": "bostonHousing", "concrete": "concrete", "energy": "energy", "yacht": "yacht"}
_PACKAGE_DATA = "uci_splits"


def _check_name(name: str) -> str:
    if name not in UCI_FOLDERS:
        raise ValueError(f"unknown UCI set {name!r}; choose one of {sorted(UCI_FOLDERS)}.")
    return UCI_FOLDERS[name]


@functools.lru_cache(maxsize=None)
def _files(name: str) -> Dict[str, bytes]:
    """The files of one set, ``{file name: bytes}``, read once from the package's zip."""
    archive = resources.files(__package__).joinpath(_PACKAGE_DATA, f"{_check_name(name)}.zip")
    with archive.open("rb") as f, zipfile.ZipFile(io.BytesIO(f.read())) as z:
        return {n: z.read(n) for n in z.namelist()}


def _array(name: str, file: str, dtype=float) -> np.ndarray:
    return np.loadtxt(io.BytesIO(_files(name)[file]), dtype=dtype)


def _number(name: str, file: str) -> int:
    return int(_files(name)[file].split()[0])


def readme() -> str:
    """The packaged data's README: provenance, protocol and published results."""
    return resources.files(__package__).joinpath(_PACKAGE_DATA, "README.md").read_text()


def num_splits(name: str) -> int:
    """Number of standard train/test splits of UCI set ``name`` (20)."""
    return _number(name, "n_splits.txt")


def hidden_units(name: str) -> int:
    """Hidden units of the reference one-hidden-layer network (50 for these four sets)."""
    return _number(name, "n_hidden.txt")


def load_uci(name: str, split: int = 0, dtype=torch.float32) -> Dataset:
    """Split ``split`` (0-19) of UCI set ``name`` (boston, concrete, energy, yacht).

    >>> ds = ps.data.load_uci("yacht", split=3)
    >>> ds.x_train.shape, ds.x_test.shape
    (torch.Size([277, 6]), torch.Size([31, 6]))
    """
    _check_name(name)
    n = num_splits(name)
    if not (isinstance(split, int) and 0 <= split < n):
        raise ValueError(f"split must be an integer in [0, {n}), got {split!r}.")
    data = _array(name, "data.txt")
    features = _array(name, "index_features.txt", int).reshape(-1)
    target = int(_array(name, "index_target.txt", int))
    tr = _array(name, f"index_train_{split}.txt", int)
    te = _array(name, f"index_test_{split}.txt", int)
    X, y = data[:, features], data[:, target]
    mu, sd = X[tr].mean(0), X[tr].std(0)
    sd[sd == 0] = 1.0
    ym, ys = float(y[tr].mean()), float(y[tr].std())
    Xs, ysd = (X - mu) / sd, (y - ym) / ys
    t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    return Dataset(f"uci_{name}_{split}", t(Xs[tr]), t(ysd[tr]), t(Xs[te]), t(ysd[te]), "regression", 1, ym, ys)
