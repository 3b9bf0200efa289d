"""Selection strategies of the subnetwork-inference paper and laplace-torch's, plus whole-site ones.

* :class:`LargestVariance`: the paper's Wasserstein criterion. Under a factorised stand-in for
  the full posterior, :math:`W_2^2(p, q_S) = \\sum_{d \\notin S} \\sigma_d^2`, minimised by keeping
  the ``k`` largest marginal variances (Daxberger et al., 2021, sec. 3). ``method="swag"`` takes
  them from diagonal SWAG as the paper did; ``"diag_laplace"`` from :math:`1 / (G_{dd} + p_d)`,
  which ranks the *least* curved weights first: often weights the outputs do not depend on.
* :class:`LargestMagnitude`, :class:`Random`: the paper's baselines.
* :class:`ByName`, :class:`LastLayer`, :class:`All`: whole weight sites.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Optional, Union

import torch

from ....data.batches import tensors
from ...curvature import ggn
from ...randomness import resolve_seed
from .contract import SubnetSelection, candidates, model_view
from .swag import swag_diagonal_variance


def training_data(data):
    """``(x, y)`` tensors of the training data, from a pair or a DataLoader of ``(x, y)`` batches."""
    if data is None:
        raise ValueError("this selection strategy needs the training data.")
    return tensors(data, targets=True, what="subnetwork selection")


class LargestMagnitude(SubnetSelection):
    """The ``k`` weights of largest :math:`|\\hat\\theta_d|`.

    >>> ps.subnet.LargestMagnitude(100)
    LargestMagnitude(k=100)
    """

    def scores(self, model, theta, data, prior_precision, progress=False):
        return theta.abs()


class Random(SubnetSelection):
    """``k`` weights uniformly at random (reproducible with ``seed``; ``None``, the default, draws
    the seed from torch's global generator, so ``pyro.set_rng_seed`` governs it)."""

    def __init__(self, k: Optional[int] = None, seed: Optional[int] = None, max_memory=None,
                 exclude_normalisation: bool = True):
        super().__init__(k, max_memory, exclude_normalisation)
        self.seed = seed

    def scores(self, model, theta, data, prior_precision, progress=False):
        gen = torch.Generator().manual_seed(resolve_seed(self.seed, shared=False))
        return torch.rand(theta.shape[0], generator=gen, dtype=torch.float64).to(theta.device)


class LargestVariance(SubnetSelection):
    """The ``k`` weights of largest marginal posterior variance (the Wasserstein criterion).

    :param method: ``"swag"`` (diagonal SWAG, the paper's choice, default) or
        ``"diag_laplace"`` (:math:`1/(\\mathrm{diag}\\,G + p)`).
    :param swag_kwargs: passed to :func:`~pyro_subnet.subnet.swag_diagonal_variance`
        (``num_snapshots``, ``lr``, ``batch_size``, ``seed``).
    :param batch_size: mini-batch size of the diagonal GGN.

    >>> ps.subnet.LargestVariance(1000, method="diag_laplace")
    LargestVariance(k=1000, method='diag_laplace')
    """

    def __init__(self, k: Optional[int] = None, method: str = "swag", max_memory=None,
                 exclude_normalisation: bool = True, batch_size: int = 256, **swag_kwargs):
        super().__init__(k, max_memory, exclude_normalisation)
        if method not in ("swag", "diag_laplace"):
            raise ValueError(f"LargestVariance: method must be 'swag' or 'diag_laplace', got {method!r}.")
        self.method = method
        self.batch_size = batch_size
        self.swag_kwargs = swag_kwargs

    def variances(self, model, theta, data, prior_precision, progress=False) -> torch.Tensor:
        """The marginal variances ``(D,)`` the strategy ranks by."""
        if self.method == "diag_laplace":
            g = ggn(model.network, model.likelihood, theta, data, structure="diag",
                    batch_size=self.batch_size, progress=progress)
            return 1.0 / (g + prior_precision)
        x, y = training_data(data)
        return swag_diagonal_variance(model, theta, x, y, progress=progress, **self.swag_kwargs)

    def scores(self, model, theta, data, prior_precision, progress=False):
        return self.variances(model, theta, data, prior_precision, progress)

    def __repr__(self):
        return super().__repr__()[:-1] + f", method={self.method!r})"


class _SiteSelection(SubnetSelection):
    """Every weight of some sites (``k`` follows from the sites)."""

    def __init__(self, exclude_normalisation: bool = True):
        super().__init__(None, None, exclude_normalisation)

    def site_names(self, model) -> Iterable[str]:
        raise NotImplementedError

    def select(self, model, theta, data=None, prior_precision=None, progress=False):
        model = model_view(model, data)
        names = list(self.site_names(model))
        mask = candidates(model, self.exclude_normalisation, device=theta.device)
        idx = model.layout.site_index_ranges(names).to(theta.device)
        idx = idx[mask[idx]]
        if idx.numel() == 0:
            raise ValueError(f"{self!r} selects no weights of the sites {model.layout.names}.")
        return torch.sort(idx).values

    def __repr__(self):
        return f"{type(self).__name__}()"


class All(_SiteSelection):
    """Every weight (full-network Laplace when used with AutoSubnetLaplace)."""

    def site_names(self, model):
        return model.layout.names


class LastLayer(_SiteSelection):
    """The parameters of the last layer (the module owning the last weight site)."""

    def site_names(self, model):
        last = model.layout.names[-1]
        owner = last.rsplit(".", 1)[0] if "." in last else ""
        return [n for n in model.layout.names if (n.rsplit(".", 1)[0] if "." in n else "") == owner]


class ByName(_SiteSelection):
    """The sites whose names match any of ``patterns`` (``fnmatch``, e.g. ``"*.weight"``)."""

    def __init__(self, patterns: Union[str, Iterable[str]], exclude_normalisation: bool = True):
        super().__init__(exclude_normalisation)
        self.patterns = [patterns] if isinstance(patterns, str) else list(patterns)

    def site_names(self, model):
        names = [n for n in model.layout.names if any(fnmatch.fnmatchcase(n, p) for p in self.patterns)]
        if not names:
            raise ValueError(f"ByName: no weight site matches {self.patterns}; the sites are {model.layout.names}.")
        return names

    def __repr__(self):
        return f"ByName({self.patterns!r})"
