"""Input checks with errors that name the problem and the fix."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch


def as_tensor(a, name: str, dtype=None, device=None) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a if dtype is None else a.to(dtype)
    if isinstance(a, np.ndarray) or isinstance(a, (list, tuple)):
        t = torch.as_tensor(np.asarray(a), device=device)
        if dtype is not None:
            t = t.to(dtype)
        elif t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        return t
    raise TypeError(f"{name} must be a torch.Tensor or a NumPy array, got {type(a).__name__}.")


def check_data(x, y=None, likelihood: Optional[str] = None,
               num_classes: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Check a data set ``(x, y)`` and return it as tensors.

    Raises ``ValueError`` for NaN or infinite values, an empty batch, mismatched lengths, and
    labels that are not integers in ``[0, num_classes)`` for classification.
    """
    x = as_tensor(x, "x")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"x must have a leading data dimension with at least one example, got shape {tuple(x.shape)}.")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(-1).nonzero().reshape(-1)
        raise ValueError(
            f"x contains NaN or infinite values (in {len(bad)} rows, the first at row {int(bad[0])}). "
            "Impute or drop those rows before fitting."
        )
    if y is None:
        return x, None
    y = as_tensor(y, "y", device=x.device)
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"x and y have mismatched shapes: x has {x.shape[0]} rows (shape {tuple(x.shape)}) but y "
            f"has shape {tuple(y.shape)}. They need the same leading (data) dimension."
        )
    if y.is_floating_point() and not torch.isfinite(y).all():
        raise ValueError("y contains NaN or infinite values. Drop those examples before fitting.")
    if likelihood == "classification":
        if y.is_floating_point():
            if not torch.equal(y, y.round()):
                raise ValueError("classification labels y must be integers (class indices), got non-integer values.")
            y = y.long()
        if y.dim() != 1:
            raise ValueError(f"classification labels y must have shape (N,), got {tuple(y.shape)}.")
        if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
            raise ValueError(
                f"classification labels must lie in [0, {num_classes}), got values in "
                f"[{int(y.min())}, {int(y.max())}]. Check the number of outputs of the network."
            )
    elif likelihood == "regression":
        if not y.is_floating_point():
            y = y.to(x.dtype)
        if y.dim() == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.dim() > 2:
            raise ValueError(f"regression targets y must have shape (N,) or (N, O), got {tuple(y.shape)}.")
    return x, y
