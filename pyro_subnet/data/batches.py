"""The forms in which the methods take data, and the one way to walk over them.

A data argument is a tensor of inputs ``x``; a pair ``(x, y)`` of tensors; or an iterable of
batches (a ``torch.utils.data.DataLoader``) yielding ``(x, y)`` pairs or ``x`` alone. Every
method reads data through these functions, so all of them accept the same forms:
:func:`iter_batches` walks over any form in mini-batches, :func:`tensors` turns any form into
whole tensors, :func:`num_examples` counts examples and :func:`example_inputs` gives inputs to
trace a model on.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm


def is_tensor_pair(data) -> bool:
    """Whether ``data`` is a pair ``(x, y)`` whose inputs are a tensor (``y`` may be ``None``)."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor)


def is_array(x) -> bool:
    """Whether ``x`` is one array (a tensor, a NumPy array or a list) rather than an iterable of
    batches."""
    return isinstance(x, (torch.Tensor, np.ndarray, list))


def iter_batches(data, batch_size: int = 256, device=None, progress: bool = False,
                 desc: str = "") -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Yield ``(x_batch, y_batch_or_None)``.

    :param data: a tensor ``x``; a pair ``(x, y)`` of tensors; or an iterable of batches
        (e.g. a ``torch.utils.data.DataLoader``) yielding ``(x, y)`` pairs or ``x`` alone.
    """
    if isinstance(data, torch.Tensor):
        data = (data, None)
    if is_tensor_pair(data):
        x, y = data
        n = x.shape[0]
        starts = range(0, n, batch_size)
        for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
            yield (_to(x[s:s + batch_size], device),
                   None if y is None else _to(y[s:s + batch_size], device))
        return
    for batch in tqdm(data, desc=desc, disable=not progress, leave=False):
        if isinstance(batch, (tuple, list)):
            xb = batch[0]
            yb = batch[1] if len(batch) > 1 else None
        else:
            xb, yb = batch, None
        yield _to(xb, device), None if yb is None else _to(yb, device)


def _to(t: torch.Tensor, device):
    return t if device is None or t.device == torch.device(device) else t.to(device)


def tensors(data, targets: bool = False, what: str = "fit") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(x, y)`` as whole tensors from any form :func:`iter_batches` accepts: a tensor ``x``
    (``y`` is then ``None``) and a pair as they are, the batches of an iterable concatenated.

    :param targets: the batches of an iterable must carry targets ``y`` (the error names ``what``).
    """
    if isinstance(data, torch.Tensor):
        return data, None
    if is_tensor_pair(data):
        return data[0], data[1]
    xs, ys = [], []
    for xb, yb in iter_batches(data):
        if yb is None and targets:
            raise ValueError(f"{what}: the DataLoader must yield (x, y) pairs.")
        xs.append(xb)
        ys.append(yb)
    if not xs:
        raise ValueError(f"{what}: the DataLoader is empty.")
    return torch.cat(xs), None if any(yb is None for yb in ys) else torch.cat(ys)


def example_inputs(data) -> torch.Tensor:
    """Inputs of ``data`` to trace a model on: all of them for a tensor or a pair, the first
    batch's for an iterable of batches."""
    if isinstance(data, torch.Tensor):
        return data
    if isinstance(data, (tuple, list)):
        return data[0]
    return next(iter_batches(data))[0]


def num_examples(data) -> int:
    """Number of examples in ``data`` (as accepted by :func:`iter_batches`)."""
    if isinstance(data, torch.Tensor):
        return data.shape[0]
    if is_tensor_pair(data):
        return data[0].shape[0]
    dataset = getattr(data, "dataset", None)
    if dataset is not None:
        return len(dataset)
    return sum(b[0].shape[0] if isinstance(b, (tuple, list)) else b.shape[0] for b in data)
