"""One way to walk over data: tensors, an ``(x, y)`` pair, or a DataLoader."""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from tqdm.auto import tqdm


def iter_batches(data, batch_size: int = 256, device=None, progress: bool = False,
                 desc: str = "") -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Yield ``(x_batch, y_batch_or_None)``.

    :param data: a tensor ``x``; a pair ``(x, y)`` of tensors; or an iterable of batches
        (e.g. a ``torch.utils.data.DataLoader``) yielding ``(x, y)`` pairs or ``x`` alone.
    """
    if isinstance(data, torch.Tensor):
        data = (data, None)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
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


def num_examples(data) -> int:
    """Number of examples in ``data`` (as accepted by :func:`iter_batches`)."""
    if isinstance(data, torch.Tensor):
        return data.shape[0]
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return data[0].shape[0]
    dataset = getattr(data, "dataset", None)
    if dataset is not None:
        return len(dataset)
    return sum(b[0].shape[0] if isinstance(b, (tuple, list)) else b.shape[0] for b in data)
