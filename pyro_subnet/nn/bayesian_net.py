"""The bridge from a plain torch module to a batch-aware Pyro model."""

from __future__ import annotations

import copy
import fnmatch
from typing import Callable, Dict, Mapping, Optional, Union

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from .functional import FunctionalNet, _has_pyro_samples
from .likelihoods import Likelihood, make_likelihood
from .validation import as_tensor, check_model_data

PriorSpec = Union[None, dist.Distribution, Callable[[str, torch.Size], dist.Distribution]]


class BayesianNet(PyroModule):
    """A Pyro model made from a plain torch module: a prior on every weight and a likelihood.

    .. math::

        w_s \\sim p(w_s) \\;(\\text{default } \\mathcal{N}(0, \\text{prior\\_scale}^2 I))
        \\text{ for each parameter } s, \\qquad
        y_n \\mid x_n, w \\sim p(y_n \\mid f(x_n; w)),

    with ``p(y | f)`` Categorical on logits ``f`` (``likelihood="classification"``) or
    ``Normal(f, noise_scale)`` (``"regression"``). The weight sites are named after the
    parameters (``"0.weight"``, ``"fc1.bias"``, ...), the observed site is ``"obs"`` inside
    ``pyro.plate("data", N, subsample_size=subsample_size)``, and the model returns ``f`` (the
    logits or the mean).

    The model is *batch-aware*: when the weight sites carry leading sample dimensions (as under
    ``Predictive(..., parallel=True)``, or ``arviz.from_pyro``'s log-likelihood), every draw is
    evaluated at once with ``torch.func.vmap``, and ``f`` gets those dimensions in front of
    ``(N, O)``. Global weights sit outside the data plate (dim ``-1``), so a weight batch shape
    ``(S, 1)`` means ``S`` draws.

    :param net: an ``nn.Module`` mapping ``x`` of shape ``(N, ...)`` to ``(N, O)``: a plain one (its
        parameters get the prior below), or a ``PyroModule`` network whose weights are
        ``PyroSample`` sites with priors of their own (found by tracing it on the first input).
    :param likelihood: ``"classification"``, ``"regression"`` or a :class:`~pyro_subnet.nn.Likelihood`.
    :param prior_scale: standard deviation of the default Normal prior; a number, or a dict from
        site-name patterns (``fnmatch``) to numbers, e.g. ``{"*.bias": 10.0, "*": 1.0}``.
    :param noise_scale: observation noise of the regression likelihood; ``None`` means "learn
        it" (a hyperparameter, starting at 1, that the inference method fits: by the evidence in
        the Laplace guides, by EM in the samplers; ``model.likelihood.noise_scale`` holds it).
    :param subsample_size: mini-batch size of the data plate (``None``: all data).
    :param prior: replaces the Normal prior: a distribution with scalar batch shape (expanded to
        each site, e.g. :class:`~pyro_subnet.distributions.SpikeSlab`) or a callable
        ``(name, shape) -> distribution`` with event shape ``shape``.

    >>> net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    >>> model = ps.nn.BayesianNet(net, likelihood="classification", prior_scale=1.0)
    >>> x, y = torch.randn(10, 2), torch.randint(0, 3, (10,))
    >>> trace = pyro.poutine.trace(model).get_trace(x, y)
    >>> sorted(n for n in trace.nodes if n not in ("_INPUT", "_RETURN", "data"))
    ['0.bias', '0.weight', '2.bias', '2.weight', 'obs']
    """

    def __init__(self, net: nn.Module, likelihood: Union[str, Likelihood] = "classification",
                 prior_scale: Union[float, Mapping[str, float]] = 1.0, noise_scale: Optional[float] = 0.1,
                 subsample_size: Optional[int] = None, prior: PriorSpec = None):
        super().__init__()
        pyro_net = _has_pyro_samples(net)
        if pyro_net and (prior is not None or prior_scale != 1.0):
            raise ValueError("BayesianNet: this PyroModule network has PyroSample priors of its own, which are "
                             "used; prior= and prior_scale= are for plain torch networks.")
        # A PyroModule network's sites are found by tracing it, on the first input it sees.
        self._network = None if pyro_net else FunctionalNet(net)
        self._pyro_net = (net,) if pyro_net else None
        self.likelihood = make_likelihood(likelihood, noise_scale)
        if subsample_size is not None and (not isinstance(subsample_size, int) or subsample_size < 1):
            raise ValueError(f"subsample_size must be a positive integer or None, got {subsample_size!r}.")
        self.subsample_size = subsample_size
        self.prior_scale = prior_scale
        self.prior = prior
        self._scales = {} if pyro_net else self._site_scales()
        self._normal_priors = {}      # (site, dtype, device) -> its default Normal prior under _scales

    # ----------------------------------------------------------------------------------------
    @property
    def network(self) -> FunctionalNet:
        """The network as a function of its weight sites (:class:`~pyro_subnet.nn.FunctionalNet`)."""
        if self._network is None:
            raise RuntimeError("BayesianNet: the PyroModule network's weight sites are found on its first input; "
                               "call the model once (model(x)) or hand it to a method first.")
        return self._network

    def _discover(self, x: torch.Tensor) -> None:
        if self._network is None:
            x = as_tensor(x, "x")
            with torch.random.fork_rng(), pyro.poutine.block():   # a look at the net, not part of any trace
                self._network = FunctionalNet(self._pyro_net[0], example_input=x)

    @property
    def layout(self):
        """The :class:`~pyro_subnet.nn.SiteLayout` of the weight sites."""
        return self.network.layout

    @property
    def net(self) -> nn.Module:
        return self.network.module

    @property
    def noise_scale(self):
        return getattr(self.likelihood, "noise_scale", None)

    def set_prior_scale(self, prior_scale: Union[float, Mapping[str, float]]) -> None:
        """Replace the default Normal prior's scale (a number or a dict of site patterns, as in the
        constructor), e.g. with one chosen by the evidence (:func:`~pyro_subnet.infer.fit_map_by_evidence`).
        Bridges and guides built from now on see the new prior."""
        if self.prior is not None or self._pyro_net is not None:
            raise ValueError("set_prior_scale: only the default Normal prior has a scale; this model's prior is "
                             "its own (prior= or PyroSample sites).")
        old = self.prior_scale
        self.prior_scale = prior_scale
        try:
            self._scales = self._site_scales()
        except ValueError:
            self.prior_scale = old
            raise
        self._normal_priors = {}

    def _site_scales(self) -> dict:
        """Each weight site's prior scale under :attr:`prior_scale` (checked: a dict must cover every site)."""
        return {n: self._scale_for(n) for n in self.layout.names}

    def _scale_for(self, name: str) -> float:
        s = self.prior_scale
        if isinstance(s, Mapping):
            for pattern, value in s.items():
                if fnmatch.fnmatchcase(name, pattern):
                    s = value
                    break
            else:
                raise ValueError(f"prior_scale: no pattern matches site {name!r}; add a '*' entry.")
        if not (isinstance(s, (int, float)) and s > 0):
            raise ValueError(f"prior_scale must be positive, got {s!r} for site {name!r}.")
        return float(s)

    def prior_precision(self, dtype=None, device=None) -> torch.Tensor:
        """Per-weight prior precision ``1 / prior_scale^2`` of the Normal prior, shape ``(D,)``.

        Only defined for the default Normal prior (the Laplace guides start from it)."""
        if self.prior is not None or self._pyro_net is not None:
            raise ValueError("prior_precision() is defined for the default Normal prior only.")
        parts = [torch.full((self.layout.shapes[n].numel(),), self._scales[n] ** -2, dtype=dtype, device=device)
                 for n in self.layout.names]
        return torch.cat(parts)

    def site_prior(self, name: str, like: torch.Tensor) -> dist.Distribution:
        """The prior distribution of weight site ``name`` (event shape = the site's shape)."""
        shape = self.layout.shapes[name]
        if self._pyro_net is not None:
            return self.network.priors()[name]
        if self.prior is None:
            # built once per site, dtype and device: every model call (each SVI step, each trace) reads it
            key = (name, like.dtype, like.device)
            prior = self._normal_priors.get(key)
            if prior is None:
                zero = torch.zeros((), dtype=like.dtype, device=like.device)
                prior = dist.Normal(zero, zero + self._scales[name]).expand(shape).to_event(len(shape))
                self._normal_priors[key] = prior
            return prior
        if isinstance(self.prior, dist.Distribution) or isinstance(self.prior, torch.distributions.Distribution):
            return self.prior.expand(shape).to_event(len(shape))
        return self.prior(name, shape)

    def with_subsample_size(self, subsample_size: Optional[int]) -> "BayesianNet":
        """A view of this model with another mini-batch size (``None``: all data). The views
        share the network and priors; only the data plate differs."""
        view = copy.copy(self)
        view.__dict__["subsample_size"] = subsample_size
        return view

    def initial_values(self) -> Dict[str, torch.Tensor]:
        """The wrapped network's own weights (e.g. a pretrained MAP)."""
        return self.network.initial_values()

    def initial_theta(self, dtype=None, device=None) -> torch.Tensor:
        """The wrapped network's weights as one flat vector ``(D,)``."""
        return self.layout.flatten(self.initial_values()).to(dtype=dtype, device=device)

    # ----------------------------------------------------------------------------------------
    def forward(self, x, y=None):
        self._discover(x)
        x, y = check_model_data(self, x, y)
        params = {n: pyro.sample(n, self.site_prior(n, x)) for n in self.layout.names}
        sample_shape = self._sample_shape(params)
        with pyro.plate("data", x.shape[0], subsample_size=self.subsample_size, device=x.device) as idx:
            xb = x if self.subsample_size is None else x.index_select(0, idx)
            f = self.network.batched(params, xb, sample_shape)
            yb = None if y is None else (y if self.subsample_size is None else y.index_select(0, idx))
            pyro.sample("obs", self.likelihood.distribution(f), obs=yb)
        return f

    def _sample_shape(self, params) -> torch.Size:
        shapes = self.layout.shapes
        batch = torch.broadcast_shapes(*(v.shape[: v.dim() - len(shapes[n])] for n, v in params.items()))
        # Global weights sit outside the data plate (dim -1): a trailing 1 is that plate's slot.
        if len(batch) and batch[-1] == 1:
            batch = batch[:-1]
        return batch
