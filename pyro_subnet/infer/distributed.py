"""Data and particle parallelism on PyTorch's own engine, ``torch.distributed``.

Launch any script that uses pyro_subnet with ``torchrun --nproc_per_node=N script.py``; the
script calls :func:`init` once (gloo on CPU, NCCL on CUDA) and the methods see the process group:

* the MAP and the Laplace guides shard the data by rank; gradients, GGNs and sample-then-optimise
  products are summed with ``all_reduce``, so every rank ends with the same guide, equal to the
  single-process one;
* :class:`~pyro_subnet.infer.AnnealedSMC` shards the particles and resamples across ranks;
* the SG-MCMC kernels run one chain per rank; :func:`gather_chains` brings the chains to rank 0
  for :func:`pyro_subnet.to_inference_data`.

End a script with :func:`shutdown` (a barrier, then teardown), so that no rank exits while
another still reads from it. Usage: ``docs/distributed.md``; timings: ``benchmarks/distributed.py``.

Everything here is a no-op in a single process, so library code calls these helpers
unconditionally. A rank that raises makes ``torchrun`` stop the whole group (and every
collective has a timeout), so a failure ends the run instead of hanging it.
"""

from __future__ import annotations

import datetime
import os
import warnings
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ..data.batches import is_tensor_pair, tensors
from . import draws


def is_active() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def init(backend: Optional[str] = None, timeout_s: float = 300.0) -> int:
    """Join the process group that ``torchrun`` set up (reads ``RANK``/``WORLD_SIZE`` from the
    environment); ``backend`` defaults to NCCL when CUDA is available, else gloo. Returns the
    rank. Does nothing outside ``torchrun``."""
    if "RANK" not in os.environ or (dist.is_available() and dist.is_initialized()):
        return rank()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank()


def shutdown() -> None:
    """Leave the process group: wait for every rank, then tear it down. Call it at the end of a
    script, so that no rank exits (closing its connections) while another still reads from it."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def shard(n: int) -> slice:
    """This rank's contiguous share of ``n`` items (the first ``n % world`` ranks get one more)."""
    w, r = world_size(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def local_share(x: torch.Tensor, y: Optional[torch.Tensor] = None):
    """``(x[shard], y[shard], offset)``: this rank's contiguous share of a data set that every
    rank holds whole, and where it starts in the global order (``offset`` keys per-example random
    draws, so they do not depend on the number of ranks)."""
    part = shard(x.shape[0])
    return x[part], None if y is None else y[part], part.start


def tensor_data(data, what: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(x, y)`` tensors from a tensor or a pair; under a process group a DataLoader cannot be
    split by example, so it is refused with the fix."""
    if isinstance(data, torch.Tensor) or is_tensor_pair(data):
        return tensors(data)
    raise ValueError(f"{what}: under torch.distributed pass the whole data set as tensors (x, y) on every "
                     "rank; pyro_subnet splits it between the ranks itself.")


def _comm_device(t: torch.Tensor) -> torch.device:
    """Where a collective on ``t`` must run: NCCL only moves CUDA tensors, gloo any."""
    if t.device.type != "cuda" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def _in_place(op, t: torch.Tensor) -> torch.Tensor:
    """Apply an in-place collective ``op`` to ``t``, through a copy on the backend's device if
    ``t`` lives elsewhere (a CPU statistic under NCCL)."""
    dev = _comm_device(t)
    if dev == t.device:
        op(t)
    else:
        buf = t.to(dev)
        op(buf)
        t.copy_(buf)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place, also returned)."""
    if is_active():
        _in_place(lambda b: dist.all_reduce(b, op=dist.ReduceOp.SUM), t)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if is_active():
        all_reduce_sum(t)
        t /= dist.get_world_size()
    return t


def all_gather_cat(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's tensor along ``dim`` (sizes may differ between ranks)."""
    if not is_active():
        return t
    dev = _comm_device(t)
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[dim]], device=dev))
    sizes = [int(s) for s in sizes]
    moved = t.movedim(dim, 0).contiguous()
    padded = torch.zeros(max(sizes), *moved.shape[1:], dtype=t.dtype, device=dev)
    padded[: moved.shape[0]] = moved
    bufs = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(bufs, padded)
    return torch.cat([b[:s] for b, s in zip(bufs, sizes)]).movedim(0, dim).to(t.device)


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``src``'s values of ``t`` on every rank (in place, also returned)."""
    if is_active():
        _in_place(lambda b: dist.broadcast(b, src), t)
    return t


def broadcast_object(obj, src: int = 0):
    """``src``'s Python object (e.g. a tensor whose shape only ``src`` knows), on every rank."""
    if not is_active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src)
    return box[0]


# ----------------------------------------------------------------------------------------------
# One chain (or a few) per rank: the SG-MCMC kernels run unchanged in every process, and their
# draws meet on one rank for ArviZ.

class GatheredChains:
    """Every rank's chains as one ``pyro.infer.MCMC``-like object (``get_samples``,
    ``num_chains``, ``diagnostics``, ``kernel``, ``_args``), which
    :func:`pyro_subnet.to_inference_data` (and ``arviz.from_pyro``) read like a multi-chain run.
    Chains are numbered rank by rank."""

    def __init__(self, samples, diagnostics, kernel, args, kwargs):
        self._samples = samples                 # {site: (num_chains, num_draws, *shape)}
        self._diagnostics = diagnostics         # {key: {"chain i": value}}
        self.kernel = kernel
        self._args, self._kwargs = args, kwargs
        first = next(iter(samples.values()))
        self.num_chains, self.num_samples = int(first.shape[0]), int(first.shape[1])

    def get_samples(self, num_samples: Optional[int] = None, group_by_chain: bool = False):
        """The draws, as ``pyro.infer.MCMC.get_samples`` gives them (:func:`~pyro_subnet.infer.draws.get_samples`)."""
        return draws.get_samples(self._samples, num_samples, group_by_chain)

    def diagnostics(self):
        return self._diagnostics

    def __repr__(self):
        return f"GatheredChains(num_chains={self.num_chains}, num_samples={self.num_samples})"


def gather_chains(mcmc, dst: int = 0) -> Optional[GatheredChains]:
    """Gather the chains that every rank ran (e.g. one ``pyro.infer.MCMC`` chain of
    :class:`~pyro_subnet.infer.SGHMC` per rank) on rank ``dst``.

    Give each rank its own seed before running, e.g. ``pyro.set_rng_seed(seed + distributed.rank())``
    (identical chains would make R-hat meaningless; a warning says so).

    :param mcmc: this rank's finished ``pyro.infer.MCMC`` (or any object with ``get_samples``,
        ``num_chains`` and optionally ``diagnostics``, ``kernel``, ``_args``).
    :returns: on ``dst`` a :class:`GatheredChains` with ``world_size * mcmc.num_chains`` chains,
        ready for :func:`pyro_subnet.to_inference_data`; ``None`` on the other ranks. In a single
        process, the chains of ``mcmc`` itself.

    In a single process (no ``torchrun``) it returns the chains of ``mcmc`` itself:

    >>> from pyro_subnet.infer import distributed
    >>> model = ps.nn.BayesianNet(nn.Linear(2, 1), likelihood="regression", noise_scale=0.5)
    >>> x = torch.randn(40, 2); y = x @ torch.tensor([1.0, -1.0]) + 0.5 * torch.randn(40)
    >>> mcmc = pyro.infer.MCMC(ps.infer.SGHMC(model), num_samples=20, warmup_steps=20, disable_progbar=True)
    >>> mcmc.run(x, y)
    >>> chains = distributed.gather_chains(mcmc)
    >>> if distributed.rank() == 0:
    ...     print(chains, ps.to_inference_data(chains).posterior["weight"].shape)
    GatheredChains(num_chains=1, num_samples=20) (1, 20, 1, 2)
    """
    samples = {k: v.detach().cpu() for k, v in mcmc.get_samples(group_by_chain=True).items()}
    diag = mcmc.diagnostics() if callable(getattr(mcmc, "diagnostics", None)) else {}
    local_chains = next(iter(samples.values())).shape[0]
    # Only the per-chain entries travel (Pyro's per-site n_eff / r_hat do not survive a merge).
    per_chain = {key: [by_chain[f"chain {c}"] for c in range(local_chains)]
                 for key, by_chain in (diag or {}).items()
                 if isinstance(by_chain, dict) and all(f"chain {c}" in by_chain for c in range(local_chains))}
    if is_active():
        box = [None] * world_size() if rank() == dst else None
        dist.gather_object((samples, per_chain), box, dst=dst)
        if rank() != dst:
            return None
    else:
        box = [(samples, per_chain)]
    num_draws = {int(next(iter(s.values())).shape[1]) for s, _ in box}
    if len(num_draws) != 1:
        raise ValueError(f"gather_chains: the ranks ran different numbers of draws {sorted(num_draws)}; give every "
                         "rank the same num_samples.")
    merged = {k: torch.cat([s[k] for s, _ in box]) for k in box[0][0]}
    keys = set.intersection(*(set(d) for _, d in box)) if box else set()
    merged_diag = {key: {f"chain {i}": v for i, v in enumerate(x for _, d in box for x in d[key])} for key in keys}
    first = next(iter(merged.values()))
    if first.shape[0] > 1 and all(torch.equal(first[0], first[c]) for c in range(1, first.shape[0])):
        warnings.warn("gather_chains: every chain is identical; seed each rank differently, e.g. "
                      "pyro.set_rng_seed(seed + distributed.rank()).", RuntimeWarning, stacklevel=2)
    return GatheredChains(merged, merged_diag, getattr(mcmc, "kernel", None), getattr(mcmc, "_args", ()),
                          getattr(mcmc, "_kwargs", {}) or {})
