"""Input checks shared by every method, with errors that name the problem and the fix.

:func:`check_data` is the one gate data pass through before any work is done (``fit``, MAP,
samplers, SMC, the predictives, the model itself). It accepts tensors, NumPy arrays and lists
(converted to the network's dtype and device; tensors keep their own, the methods follow the
data), and checks:

* ``x``: a leading data dimension with at least one example, no NaN or infinite values, and a
  shape the network accepts (one probe pass on one example, cached per input shape; a failure
  names the network's first layer and what it expects);
* ``y``: as many rows as ``x``, finite; classification labels integers in ``[0, C)`` for a
  ``C``-output network (the message names the classes found and ``C``); regression targets of
  shape ``(N,)`` for one output or ``(N, O)`` for ``O`` outputs.

:func:`check_model_data` is the form the methods call: the checks of :func:`check_data` against
a model's network and likelihood. :func:`check_positive_int` checks sizes such as ``batch_size``.
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn


def check_positive_int(value, name: str, allow_none: bool = False) -> Optional[int]:
    """``value`` as an ``int`` >= 1 (``None`` passes where ``allow_none``); otherwise a ``ValueError``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}.")
    return int(value)


def reference_tensor(network) -> Optional[torch.Tensor]:
    """A floating tensor of a network function (its dtype and device are what converted arrays
    get), or ``None``."""
    if network is None:
        return None
    for v in network.initial_values().values():
        if v.is_floating_point():
            return v
    return None


def as_tensor(a, name: str, like: Optional[torch.Tensor] = None, floating: bool = True) -> torch.Tensor:
    """A tensor from a tensor, a NumPy array or a list. Arrays and lists get ``like``'s dtype (for
    floating data) and device; tensors are returned as they are, except integer inputs ``x``
    (``floating``), which become floating point."""
    if isinstance(a, torch.Tensor):
        t = a
    elif isinstance(a, (np.ndarray, list, tuple)):
        try:
            t = torch.as_tensor(np.asarray(a), device=None if like is None else like.device)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} could not be read as a numeric array ({e}).") from None
        if t.is_floating_point():
            t = t.to(like.dtype if like is not None else torch.get_default_dtype())
    else:
        raise TypeError(f"{name} must be a torch.Tensor, a NumPy array or a list, got {type(a).__name__}.")
    if floating and not t.is_floating_point():
        t = t.to(like.dtype if like is not None and not isinstance(a, torch.Tensor) else torch.get_default_dtype())
    return t


def _first_layer(module: nn.Module) -> str:
    """A description of the first layer that fixes the input width, e.g. ``Linear(2, 16) at '0'``."""
    for name, m in module.named_modules():
        for attr in ("in_features", "in_channels", "input_size", "num_features"):
            if hasattr(m, attr) and isinstance(getattr(m, attr), int):
                return f"{type(m).__name__} at {name or 'the root'!r} with {attr}={getattr(m, attr)}"
    return type(module).__name__


def num_outputs(network, x: torch.Tensor) -> int:
    """The network's output width for inputs shaped like ``x`` (one probe pass on one example at
    the network's own weights, cached per input shape); a ``ValueError`` naming the first layer
    when the network does not accept that shape."""
    cache = network.__dict__.setdefault("_probe_cache", {})
    key = (tuple(x.shape[1:]), x.dtype, x.device.type)
    if key not in cache:
        params = {n: v.to(device=x.device, dtype=x.dtype if v.is_floating_point() else v.dtype)
                  for n, v in network.initial_values().items()}
        try:
            with torch.no_grad():
                out = network(params, x[:1])
        except (RuntimeError, ValueError, IndexError) as e:
            raise ValueError(
                f"x has shape {tuple(x.shape)} ({tuple(x.shape[1:])} per example), which the network does not "
                f"accept: its first layer is {_first_layer(network.module)} ({str(e).splitlines()[0]}). Pass inputs "
                "with the shape the network was built for."
            ) from None
        if not torch.is_tensor(out) or out.dim() < 2 or out.shape[0] != 1:
            raise ValueError(f"the network must map x of shape (N, ...) to outputs (N, O); for one example it "
                             f"returned {tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}.")
        cache[key] = int(out.shape[-1])
    return cache[key]


def check_data(x, y=None, likelihood: Optional[str] = None, num_classes: Optional[int] = None,
               network=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Check a data set ``(x, y)`` and return it as tensors (see the module docstring).

    :param likelihood: ``"classification"`` or ``"regression"`` (checks ``y`` accordingly).
    :param num_classes: the number of classes (default: the network's output width).
    :param network: a :class:`~pyro_subnet.nn.FunctionalNet`: its dtype and device for converted
        arrays, and the shape checks of ``x`` and ``y`` against it.
    """
    ref = reference_tensor(network)
    x = as_tensor(x, "x", ref)
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"x must have a leading data dimension with at least one example, got shape {tuple(x.shape)}.")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(-1).nonzero().reshape(-1)
        raise ValueError(
            f"x contains NaN or infinite values (in {len(bad)} rows, the first at row {int(bad[0])}). "
            "Impute or drop those rows first."
        )
    outputs = num_outputs(network, x) if network is not None else None
    if y is None:
        return x, None
    y = as_tensor(y, "y", x, floating=False)
    if y.device != x.device:
        y = y.to(x.device)
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"x and y have mismatched shapes: x has {x.shape[0]} rows (shape {tuple(x.shape)}) but y "
            f"has shape {tuple(y.shape)}. They need the same leading (data) dimension."
        )
    if y.is_floating_point() and not torch.isfinite(y).all():
        raise ValueError("y contains NaN or infinite values. Drop those examples first.")
    if likelihood == "classification":
        if y.is_floating_point():
            if not torch.equal(y, y.round()):
                raise ValueError("classification labels y must be integers (class indices), got non-integer values.")
            y = y.long()
        if y.dim() != 1:
            raise ValueError(f"classification labels y must have shape (N,), got {tuple(y.shape)}.")
        classes = num_classes if num_classes is not None else outputs
        if y.min() < 0 or (classes is not None and y.max() >= classes):
            found = torch.unique(y).tolist()
            shown = ", ".join(map(str, found[:12])) + (", ..." if len(found) > 12 else "")
            raise ValueError(
                f"classification labels must lie in [0, {classes}) for a network with {classes} outputs (one per "
                f"class); the labels hold the classes {{{shown}}}. Relabel them as 0..C-1, or give the network as "
                "many outputs as there are classes."
            )
    elif likelihood == "binary":
        if y.dim() == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.dim() != 1 or not bool(((y == 0) | (y == 1)).all()):
            found = torch.unique(y).tolist()[:12]
            raise ValueError(f"binary labels y (a Bernoulli observation) must be 0 or 1 with shape (N,); got shape "
                             f"{tuple(y.shape)} with values {found}.")
        y = y.to(x.dtype)
    elif likelihood == "regression":
        if not y.is_floating_point():
            y = y.to(x.dtype)
        if y.dim() == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.dim() > 2:
            raise ValueError(f"regression targets y must have shape (N,) or (N, O), got {tuple(y.shape)}.")
        if outputs is not None:
            per_example = 1 if y.dim() == 1 else y.shape[1]
            if per_example != outputs:
                raise ValueError(
                    f"regression targets y have shape {tuple(y.shape)}: {per_example} values per example, but the "
                    f"network has {outputs} output{'s' if outputs != 1 else ''}. Give y shape "
                    f"{'(N,)' if outputs == 1 else f'(N, {outputs})'}, or a network with {per_example} outputs."
                )
    return x, y


def check_model_data(model, x, y=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`check_data` against ``model.network`` and ``model.likelihood``: what every method
    calls on the data it is given, before any work."""
    return check_data(x, y, model.likelihood.name, network=model.network)
