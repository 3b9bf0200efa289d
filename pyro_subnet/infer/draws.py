"""The draws of the objects that behave like ``pyro.infer.MCMC``.

:class:`~pyro_subnet.infer.AnnealedSMC` and the chains that
:func:`~pyro_subnet.infer.distributed.gather_chains` brings together both hold their draws as
``{site: (num_chains, num_draws, *shape)}`` and answer ``get_samples`` as ``MCMC`` does, through
:func:`get_samples`.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch


def get_samples(samples: Dict[str, torch.Tensor], num_samples: Optional[int] = None,
                group_by_chain: bool = False) -> Dict[str, torch.Tensor]:
    """Draws per site: ``(num_chains, num_draws, *shape)`` if ``group_by_chain`` else
    ``(num_chains * num_draws, *shape)``; ``num_samples`` picks that many draws at random (with
    replacement, torch's global generator), as ``pyro.infer.MCMC.get_samples`` does.

    :param samples: ``{site: (num_chains, num_draws, *shape)}``.
    """
    if not group_by_chain:
        samples = {k: v.reshape(-1, *v.shape[2:]) for k, v in samples.items()}
    if num_samples is not None:
        if group_by_chain:
            raise ValueError("get_samples: num_samples with group_by_chain=True is not supported; "
                             "take a subset of the draws axis yourself.")
        first = next(iter(samples.values()))
        idx = torch.randint(0, first.shape[0], (num_samples,), device=first.device)
        samples = {k: v.index_select(0, idx) for k, v in samples.items()}
    return samples
