"""A network as a pure function of its weights: ``f(x, params)``.

Every method needs the network's output as a function of the weights that ``torch.func`` can
transform (``vmap`` over draws, ``jacrev``/``jvp`` for curvature). :class:`FunctionalNet` gives
that for two kinds of networks:

* a plain ``torch.nn.Module``: evaluated with ``torch.func.functional_call`` on a private deep
  copy (never on a PyroModule: ``functional_call`` leaves plain tensors in a PyroModule's
  ``__dict__`` that shadow its ``PyroSample`` attributes for good);
* a ``PyroModule`` whose weights are ``PyroSample`` sites: run under an effect handler that sets
  every weight site to the given value, with Pyro's validation off (it does data-dependent checks
  that ``vmap`` cannot trace).

The weight order is a :class:`~pyro_subnet.nn.layout.SiteLayout`, so every method also gets the
flat view ``f(x, theta)`` with ``theta`` of shape ``(D,)``.

Train and eval mode: inference evaluates the network in eval mode (``Dropout`` off,
``BatchNorm`` on its running statistics), whatever mode the user left the module in, and puts
every submodule's ``training`` flag back afterwards. Only MAP fitting runs in training mode
(:meth:`FunctionalNet.training`), so that ``BatchNorm`` learns the running statistics the
posterior then uses.

Draws are batched with ``torch.func.vmap``; a layer that ``vmap`` cannot batch (e.g. ``nn.LSTM``,
which has no batching rule) makes :meth:`FunctionalNet.batched` warn once and evaluate the draws
one by one instead.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Dict, Mapping, Optional

import pyro
import pyro.poutine as poutine
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.func import functional_call, vmap

from .layout import SiteLayout


def _has_pyro_samples(module: nn.Module) -> bool:
    return any(isinstance(m, PyroModule) and m._pyro_samples for m in module.modules())


class _SetSiteValues(poutine.messenger.Messenger):
    """Set the value of named sample sites (a ``poutine.condition`` that does not mark them
    observed and works with tensors batched by ``vmap``)."""

    def __init__(self, values: Mapping[str, torch.Tensor]):
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg):
        value = self.values.get(msg["name"])
        if value is not None:
            msg["value"] = value
            msg["done"] = True


@contextlib.contextmanager
def _in_mode(module: nn.Module, training: bool):
    """Run ``module`` with every submodule in train (``True``) or eval mode, then restore each
    submodule's own flag."""
    flags = [(m, m.training) for m in module.modules()]
    if all(flag == training for _, flag in flags):
        yield
        return
    module.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _is_missing_batching_rule(error: Exception) -> bool:
    text = str(error)
    return "Batching rule not implemented" in text or ("vmap" in text and "not supported" in text)


class NetworkFunction:
    """The contract every method uses: ``f(params, x)`` for one weight draw, and the flat and
    batched views built on it. A subclass defines ``__call__``, ``layout``, ``module`` (the
    ``nn.Module`` whose train/eval flags are set) and ``initial_values``.

    Train and eval mode: ``__call__`` runs ``module`` in eval mode unless inside
    :meth:`training` (see the module docstring).
    """

    is_pyro = False
    layout: SiteLayout

    def _init_function(self, layout: SiteLayout) -> None:
        self.layout = layout
        self._training = False
        self._vmap_ok = True

    @contextlib.contextmanager
    def training(self):
        """Inside this context the network runs in training mode (MAP fitting: ``Dropout`` on,
        ``BatchNorm`` on batch statistics, updating its running statistics)."""
        previous, self._training = self._training, True
        try:
            yield self
        finally:
            self._training = previous

    def mode(self):
        """The context that puts :attr:`module` in the mode of the current call."""
        return _in_mode(self.module, self._training)

    def __call__(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def flat(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Output for one flat weight vector ``theta`` of shape ``(D,)``."""
        return self(self.layout.unflatten(theta), x)

    def batched(self, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """Outputs for every draw at once.

        :param params: site values of shape ``(*batch, *site_shape)`` where ``batch`` holds
            ``sample_shape`` draws (it may carry extra singleton dimensions).
        :returns: ``(*sample_shape, *output_shape)``, computed with one ``vmap`` (or, where the
            network cannot be batched, a loop over the draws, with a warning).
        """
        sample_shape = torch.Size(sample_shape)
        shapes = self.layout.shapes
        batch = torch.broadcast_shapes(*(params[n].shape[: params[n].dim() - len(s)] for n, s in shapes.items()))
        if batch.numel() != sample_shape.numel():
            raise ValueError(
                f"{type(self).__name__}.batched: weight batch shape {tuple(batch)} does not hold "
                f"{tuple(sample_shape)} draws."
            )
        # Singleton dimensions (plate slots) are folded away: (S, 1, *shape) -> (S, *shape).
        flat = {n: params[n].expand(*batch, *s).reshape(-1, *s) for n, s in shapes.items()}
        if not sample_shape:
            return self({n: v[0] for n, v in flat.items()}, x)
        if self._vmap_ok:
            try:
                out = vmap(self, in_dims=(0, None), randomness="different")(flat, x)
                return out.reshape(*sample_shape, *out.shape[1:])
            except RuntimeError as error:
                if not _is_missing_batching_rule(error):
                    raise
                self._vmap_ok = False
                warnings.warn(f"torch.func.vmap cannot batch this network over weight draws ({str(error).splitlines()[0]}); "
                              "evaluating the draws one by one instead, which is slower.", RuntimeWarning, stacklevel=2)
        num = sample_shape.numel()
        out = torch.stack([self({n: v[i] for n, v in flat.items()}, x) for i in range(num)])
        return out.reshape(*sample_shape, *out.shape[1:])

    def flat_batched(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Outputs for flat weights of shape ``(*batch, D)``."""
        return self.batched(self.layout.unflatten(theta), x, theta.shape[:-1])


class FunctionalNet(NetworkFunction):
    """A network ``x -> f(x; w)`` evaluated as a pure function of its weight sites.

    :param net: a plain ``nn.Module`` (its parameters are the weight sites, named as in
        ``named_parameters()``) or a ``PyroModule`` with ``PyroSample`` weights (then
        ``example_input`` is needed to discover the sites by tracing it once).
    :param example_input: an input batch, only for PyroModule networks.

    >>> f = ps.nn.FunctionalNet(nn.Linear(3, 2))
    >>> theta = f.layout.flatten(f.initial_values())
    >>> f.flat(theta, torch.randn(5, 3)).shape
    torch.Size([5, 2])
    """

    def __init__(self, net: nn.Module, example_input: Optional[torch.Tensor] = None):
        if not isinstance(net, nn.Module):
            raise TypeError(f"FunctionalNet: expected a torch.nn.Module, got {type(net).__name__}.")
        self.is_pyro = _has_pyro_samples(net)
        if self.is_pyro:
            if example_input is None:
                raise ValueError(
                    "FunctionalNet: a PyroModule network needs example_input= to discover its "
                    "PyroSample sites."
                )
            trace = poutine.trace(poutine.block(net, hide_fn=lambda m: m["type"] != "sample")).get_trace(
                example_input
            )
            sites = [(n, s["value"].shape) for n, s in trace.nodes.items()
                     if s["type"] == "sample" and not s["is_observed"]]
            self._init = {n: s["value"].detach() for n, s in trace.nodes.items()
                          if s["type"] == "sample" and not s["is_observed"]}
            self._priors = {n: s["fn"] for n, s in trace.nodes.items()
                            if s["type"] == "sample" and not s["is_observed"]}
            self._module = (net,)
        else:
            if isinstance(net, PyroModule):
                raise ValueError(
                    f"FunctionalNet: the PyroModule {type(net).__name__} has no PyroSample weight "
                    "sites. Give its weights priors with PyroSample, or pass a plain nn.Module to "
                    "ps.nn.BayesianNet, which adds the priors for you."
                )
            sites = [(n, p.shape) for n, p in net.named_parameters()]
            if not sites:
                raise ValueError(
                    f"FunctionalNet: {type(net).__name__} has no parameters, so there are no "
                    "weights to be Bayesian about."
                )
            twin = copy.deepcopy(net).eval()     # inference mode unless training() says otherwise
            for p in twin.parameters():
                p.requires_grad_(False)
            self._init = {n: p.detach().clone() for n, p in net.named_parameters()}
            self._priors = None
            self._module = (twin,)
        self._init_function(SiteLayout(sites))

    # ----------------------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The module that is evaluated (a private copy for plain networks)."""
        return self._module[0]

    def initial_values(self) -> Dict[str, torch.Tensor]:
        """The network's own weights when it was wrapped (e.g. pretrained ones)."""
        return {n: v.clone() for n, v in self._init.items()}

    def priors(self):
        """The PyroSample priors of a PyroModule network (``None`` for a plain one)."""
        return self._priors

    def _buffers_on(self, ref: torch.Tensor) -> Dict[str, torch.Tensor]:
        buffers = dict(self.module.named_buffers())
        return {n: b.to(device=ref.device) if b.device != ref.device else b for n, b in buffers.items()}

    # ----------------------------------------------------------------------------------------
    def __call__(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Output for one weight draw ``params`` (``{site: tensor of the site's shape}``)."""
        with self.mode():
            if self.is_pyro:
                with pyro.validation_enabled(False), poutine.block(), _SetSiteValues(params):
                    return self.module(x)
            return functional_call(self.module, {**self._buffers_on(x), **params}, (x,), strict=False)
