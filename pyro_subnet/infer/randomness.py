"""Seeds for the methods' own random generators, governed by ``pyro.set_rng_seed``.

A method that draws from a private ``torch.Generator`` (so that its draws are reproducible and,
under ``torch.distributed``, identical on every rank) takes ``seed=None`` by default: the seed is
then drawn from torch's global generator, the one ``pyro.set_rng_seed`` (and ``torch.manual_seed``)
sets, so that a user's seed governs every random choice; a given integer fixes it regardless.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import distributed


def resolve_seed(seed: Optional[int], shared: bool = True) -> int:
    """``seed``, or for ``None`` a seed drawn from torch's global generator: with ``shared``, rank
    0's draw on every rank under ``torch.distributed`` (a collective: every rank must call it);
    without, this process's own draw (for work that rank 0 does alone, such as subnetwork
    selection).

    >>> import pyro
    >>> from pyro_subnet.infer.randomness import resolve_seed
    >>> pyro.set_rng_seed(0); a = resolve_seed(None)
    >>> pyro.set_rng_seed(0); a == resolve_seed(None), resolve_seed(7)
    (True, 7)
    """
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer or None, got {seed!r}.")
        return seed
    drawn = int(torch.randint(0, 2 ** 62, ()).item())
    return int(distributed.broadcast_object(drawn)) if shared else drawn
