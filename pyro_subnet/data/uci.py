"""The UCI regression benchmark with the standard 20 splits (Hernandez-Lobato & Adams, 2015).

The files are not downloaded: they travel with the project's shared folder
(``../shared/data/uci/`` from the project root). :func:`uci_root` finds it, or the directory named
by the ``PYRO_SUBNET_UCI`` environment variable. Inputs and targets are standardised with the
training split's statistics; ``Dataset.y_mean``/``y_std`` map predictions back to the original
units, in which the published test log-likelihoods and RMSEs are reported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .datasets import Dataset

UCI_FOLDERS = {"boston": "bostonHousing", "concrete": "concrete", "energy": "energy", "yacht": "yacht"}


def uci_root() -> Path:
    """Where the UCI folders are; raises ``FileNotFoundError`` naming the places looked at."""
    candidates = []
    if os.environ.get("PYRO_SUBNET_UCI"):
        candidates.append(Path(os.environ["PYRO_SUBNET_UCI"]))
    here = Path(__file__).resolve()
    candidates += [Path.cwd() / ".." / "shared" / "data" / "uci",
                   here.parents[2] / ".." / "shared" / "data" / "uci"]
    for c in candidates:
        if (c / "yacht" / "data.txt").exists():
            return c.resolve()
    raise FileNotFoundError(
        "UCI data not found (looked in " + ", ".join(str(c) for c in candidates) + "). They ship in "
        "the project's shared folder, ../shared/data/uci/ beside the project root; or set PYRO_SUBNET_UCI."
    )


def num_splits(name: str, root: Optional[Path] = None) -> int:
    root = root or uci_root()
    return int((root / UCI_FOLDERS[name] / "n_splits.txt").read_text().split()[0])


def load_uci(name: str, split: int = 0, root: Optional[Path] = None, dtype=torch.float32) -> Dataset:
    """Split ``split`` (0-19) of UCI set ``name`` (boston, concrete, energy, yacht)."""
    if name not in UCI_FOLDERS:
        raise ValueError(f"unknown UCI set {name!r}; choose one of {sorted(UCI_FOLDERS)}.")
    folder = (root or uci_root()) / UCI_FOLDERS[name]
    n = num_splits(name, folder.parent)
    if not 0 <= split < n:
        raise ValueError(f"split must lie in [0, {n}), got {split}.")
    data = np.loadtxt(folder / "data.txt")
    features = np.loadtxt(folder / "index_features.txt", dtype=int).reshape(-1)
    target = int(np.loadtxt(folder / "index_target.txt"))
    tr = np.loadtxt(folder / f"index_train_{split}.txt", dtype=int)
    te = np.loadtxt(folder / f"index_test_{split}.txt", dtype=int)
    X, y = data[:, features], data[:, target]
    mu, sd = X[tr].mean(0), X[tr].std(0)
    sd[sd == 0] = 1.0
    ym, ys = float(y[tr].mean()), float(y[tr].std())
    Xs, ysd = (X - mu) / sd, (y - ym) / ys
    t = lambda a: torch.as_tensor(a, dtype=dtype)
    return Dataset(f"uci_{name}_{split}", t(Xs[tr]), t(ysd[tr]), t(Xs[te]), t(ysd[te]), "regression", 1, ym, ys)


def hidden_units(name: str, root: Optional[Path] = None) -> int:
    """Hidden units of the reference one-hidden-layer network (50 for these four sets)."""
    return int(((root or uci_root()) / UCI_FOLDERS[name] / "n_hidden.txt").read_text().split()[0])
