"""Flat views of a model's weight sites.

Every method in :mod:`pyro_subnet.infer` works on one flat vector ``theta`` of length ``D`` that
concatenates the weight sites of a network in a fixed order (site by site, each flattened in
row-major order). :class:`SiteLayout` is that order: it maps a dict ``{site name: tensor}`` to the
flat vector and back, with any number of leading batch (sample, particle, chain) dimensions, and
it tells which site and which entry a flat index belongs to.

The layout only knows names and shapes; it holds no values, so one layout serves every draw, device
and dtype.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import torch


class SiteLayout:
    """The ordered list of weight sites of a network and their shapes.

    :param sites: ``(name, shape)`` pairs, in the order that defines the flat vector.

    >>> layout = ps.nn.SiteLayout([("fc.weight", (3, 2)), ("fc.bias", (3,))])
    >>> layout.dim
    9
    >>> theta = torch.arange(9.0)
    >>> layout.unflatten(theta)["fc.bias"]
    tensor([6., 7., 8.])
    """

    def __init__(self, sites: Iterable[Tuple[str, Sequence[int]]]):
        self._shapes: "OrderedDict[str, torch.Size]" = OrderedDict()
        for name, shape in sites:
            if name in self._shapes:
                raise ValueError(f"SiteLayout: site {name!r} appears twice.")
            self._shapes[name] = torch.Size(shape)
        if not self._shapes:
            raise ValueError(
                "SiteLayout: the network has no weight sites. Give it at least one parameter "
                "(a plain nn.Module) or one PyroSample attribute (a PyroModule)."
            )
        self._numels = [math.prod(s) for s in self._shapes.values()]
        offsets = [0]
        for n in self._numels:
            offsets.append(offsets[-1] + n)
        self._offsets = offsets

    # ----------------------------------------------------------------------------------------
    # descriptors
    @property
    def names(self) -> List[str]:
        return list(self._shapes)

    @property
    def shapes(self) -> Dict[str, torch.Size]:
        return dict(self._shapes)

    @property
    def dim(self) -> int:
        """Total number of weights ``D``."""
        return self._offsets[-1]

    def __len__(self) -> int:
        return len(self._shapes)

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}: {tuple(s)}" for n, s in self._shapes.items())
        return f"SiteLayout(D={self.dim}; {inner})"

    def __eq__(self, other) -> bool:
        return isinstance(other, SiteLayout) and list(self._shapes.items()) == list(
            other._shapes.items()
        )

    def slice(self, name: str) -> slice:
        """The slice of the flat vector that holds site ``name``."""
        i = self.names.index(name)
        return slice(self._offsets[i], self._offsets[i + 1])

    def slices(self) -> Dict[str, slice]:
        return {n: slice(self._offsets[i], self._offsets[i + 1]) for i, n in enumerate(self._shapes)}

    # ----------------------------------------------------------------------------------------
    # dict <-> flat
    def flatten(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate site values into ``(*batch, D)``.

        Each value has shape ``(*batch, *site_shape)``; the batch shapes must agree. Singleton
        batch dimensions (as Pyro's ``Predictive`` inserts them) are kept.
        """
        missing = [n for n in self._shapes if n not in values]
        if missing:
            raise ValueError(f"SiteLayout.flatten: values for sites {missing} are missing.")
        parts = []
        batch_shape = None
        for name, shape in self._shapes.items():
            v = values[name]
            event_dims = len(shape)
            if tuple(v.shape[v.dim() - event_dims:]) != tuple(shape):
                raise ValueError(
                    f"SiteLayout.flatten: site {name!r} has shape {tuple(v.shape)}, expected "
                    f"(*batch, {', '.join(map(str, shape))})."
                )
            b = v.shape[: v.dim() - event_dims]
            batch_shape = b if batch_shape is None else torch.broadcast_shapes(batch_shape, b)
            parts.append(v)
        parts = [p.expand(tuple(batch_shape) + tuple(s)).reshape(tuple(batch_shape) + (-1,))
                 for p, s in zip(parts, self._shapes.values())]
        return torch.cat(parts, dim=-1)

    def unflatten(self, theta: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Split ``(*batch, D)`` into ``{name: (*batch, *site_shape)}`` (views, no copies)."""
        if theta.shape[-1] != self.dim:
            raise ValueError(
                f"SiteLayout.unflatten: the last dimension is {theta.shape[-1]}, expected D={self.dim}."
            )
        batch = theta.shape[:-1]
        out = {}
        for i, (name, shape) in enumerate(self._shapes.items()):
            out[name] = theta[..., self._offsets[i]: self._offsets[i + 1]].reshape(tuple(batch) + tuple(shape))
        return out

    # ----------------------------------------------------------------------------------------
    # flat index -> (site, local index)
    def locate(self, indices: torch.Tensor) -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
        """Group flat indices by the site they fall in.

        :returns: a list of ``(name, positions, local)`` for every site touched, where
            ``positions`` are positions in ``indices`` and ``local`` the flat index inside the site.
        """
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.dim):
            raise ValueError(f"SiteLayout.locate: indices must lie in [0, {self.dim}).")
        offsets = torch.tensor(self._offsets, device=indices.device)
        site_of = torch.bucketize(indices, offsets[1:], right=True)
        groups = []
        for i, name in enumerate(self._shapes):
            positions = (site_of == i).nonzero().reshape(-1)
            if positions.numel():
                groups.append((name, positions, indices[positions] - self._offsets[i]))
        return groups

    def site_index_ranges(self, names: Iterable[str]) -> torch.Tensor:
        """All flat indices of the named sites, in layout order."""
        wanted = set(names)
        ranges = [torch.arange(self._offsets[i], self._offsets[i + 1])
                  for i, n in enumerate(self._shapes) if n in wanted]
        return torch.cat(ranges) if ranges else torch.empty(0, dtype=torch.long)
