"""The model bridge: what every method needs from a Pyro model, derived from a trace of it.

A Bayesian network in Pyro is a model whose latent sites are the network's weights (and perhaps a
noise scale) and whose likelihood is one observed site inside ``pyro.plate("data", N)``:

.. math::

    \\theta \\sim p(\\theta), \\qquad y_n \\mid x_n, \\theta \\sim p(y_n \\mid f(x_n; \\theta)),

with ``p(y | f)`` a ``Normal`` with mean ``f`` (regression), a ``Categorical`` with logits ``f``
or a ``Bernoulli`` with logits ``f``. :class:`ModelBridge` traces such a model once on the data and
gives every method the same view of it, whoever wrote the model:

* :attr:`~ModelBridge.layout`: the latent weight sites in execution order and their flat layout
  ``theta`` (sites with a constrained support through their transform to the real line:
  ``theta`` holds unconstrained values);
* :attr:`~ModelBridge.network`: ``f(x; theta)``, the observed distribution's parameter (the
  ``Normal`` mean; the ``Categorical`` logits as the distribution holds them, i.e. normalised to
  log-probabilities; the ``Bernoulli`` logits), shaped ``(N, O)``, as a
  :class:`~pyro_subnet.nn.functional.NetworkFunction` (flat, batched over draws with
  ``torch.func.vmap``, a warned loop where ``vmap`` cannot batch the model);
* :attr:`~ModelBridge.likelihood`: the observation model and its curvature in ``f``
  (:mod:`~pyro_subnet.nn.likelihoods`), with the noise scale of a ``Normal``: a constant, a latent
  site of the model (:attr:`~ModelBridge.noise_site`, e.g. ``sigma = pyro.sample("sigma",
  HalfNormal(1.))``), or a hyperparameter the methods learn;
* :meth:`~ModelBridge.log_prior` and :meth:`~ModelBridge.log_likelihood` as the model states
  them: every site's own prior (per-layer scales, Laplace or Student-t weights, priors that
  depend on other latents), closed form where every prior is a fixed ``Normal``.

Where a model offers them, two optional attributes make the same quantities cheaper, and change
nothing else: ``model.network``, a :class:`~pyro_subnet.nn.FunctionalNet` over exactly the weight
sites whose output is the observed distribution's parameter (evaluated without running the
model), and ``model.likelihood``, a :class:`~pyro_subnet.nn.Likelihood` the model reads at every
call (its noise scale a hyperparameter when ``learn_noise``).
:class:`~pyro_subnet.nn.BayesianNet` offers both; a user's PyroModule needs neither.

A data plate that subsamples (``pyro.plate("data", N, subsample_size=B)``) is evaluated on every
example: the model is run on windows of ``B`` examples with the plate's indices set.

>>> import pyro, pyro.distributions as dist
>>> from pyro.nn import PyroModule, PyroSample
>>> class Regression(PyroModule):
...     def __init__(self):
...         super().__init__()
...         self.fc = PyroModule[nn.Linear](1, 1)
...         self.fc.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 1]).to_event(2))
...         self.fc.bias = PyroSample(dist.Normal(0.0, 10.0).expand([1]).to_event(1))
...     def forward(self, x, y=None):
...         mu = self.fc(x).squeeze(-1)          # the weights are drawn outside the data plate
...         sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
...         with pyro.plate("data", x.shape[0]):
...             return pyro.sample("obs", dist.Normal(mu, sigma), obs=y)
>>> bridge = ps.nn.ModelBridge(Regression(), torch.randn(8, 1))
>>> bridge.layout.names, bridge.noise_site, bridge.likelihood.name
(['fc.weight', 'fc.bias'], 'sigma', 'regression')
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, NamedTuple, Optional, Tuple

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.util import site_is_subsample
from pyro.nn import PyroModule
from torch import nn
from torch.func import vmap

from .functional import FunctionalNet, NetworkFunction, _is_missing_batching_rule, _SetSiteValues
from .layout import SiteLayout
from .likelihoods import Bernoulli, Categorical, Likelihood, Normal
from .validation import as_tensor, check_data, reference_tensor

class UnsupportedModelError(ValueError):
    """The model does not have the form the bridge reads (one observed site in a data plate, a
    Normal, Categorical or Bernoulli observation, continuous latent sites)."""


#: What the observed site may be, and the likelihood each gives.
KINDS = {dist.Normal: "regression", dist.Categorical: "classification", dist.Bernoulli: "binary"}


class _CatchObserved(poutine.messenger.Messenger):
    """Record the distribution of the observed site and skip drawing it."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn = None

    def _pyro_sample(self, msg):
        if msg["name"] == self.name and not site_is_subsample(msg):
            fn = msg["fn"]
            self.fn = fn
            kind = torch.long if fn.support.is_discrete else None
            msg["value"] = torch.zeros(fn.batch_shape + fn.event_shape, dtype=kind)
            msg["done"] = True


def _base(fn):
    """The innermost distribution under ``Independent``, expanded and masked wrappers."""
    while isinstance(fn, (dist.Independent, torch.distributions.Independent, ExpandedDistribution,
                          MaskedDistribution)):
        fn = fn.base_dist
    return fn


def _kind(fn) -> Optional[str]:
    base = _base(fn)
    for t, kind in KINDS.items():
        if isinstance(base, t):
            return kind
    return None


def observed_parameter(fn) -> torch.Tensor:
    """``f`` of shape ``(N, O)`` from the observed site's distribution (see the module docstring)."""
    base = _base(fn)
    shape = fn.batch_shape + fn.event_shape
    if isinstance(base, dist.Normal):
        f = base.loc.expand(shape)
    elif isinstance(base, dist.Categorical):
        f = base.logits.expand(fn.batch_shape + base.logits.shape[-1:])
        return f.reshape(-1, f.shape[-1])
    else:
        f = base.logits.expand(shape)
    if f.dim() == 1:
        return f.unsqueeze(-1)
    return f.reshape(f.shape[0], -1)


def _observed_scale(fn) -> torch.Tensor:
    return _base(fn).scale.expand(fn.batch_shape + fn.event_shape)


class _Site(NamedTuple):
    """A latent site as the bridge sees it."""

    name: str
    shape: torch.Size          # shape of the constrained value (one draw)
    fn: object                 # its prior, as traced
    transform: object          # unconstrained -> constrained (identity for real sites)
    value: torch.Tensor        # the traced (prior) draw, constrained


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _unchecked(fn):
    """A copy of a traced distribution that does not check its arguments: the methods evaluate the
    prior at proposals that may be rejected for being NaN or out of the support (the user's own
    distribution objects, e.g. a PyroSample prior, are left as they are). Shallow copies of the
    wrapper chain (``Independent``, expanded, masked, transformed) down to the base distribution:
    the flag lives on each object, and the parameter tensors they share are not written to."""
    top = d = copy.copy(fn)
    while True:
        d._validate_args = False
        base = getattr(d, "base_dist", None)
        if base is None:
            return top
        d.base_dist = base = copy.copy(base)
        d = base


def _latent_sites(trace, exclude) -> List[_Site]:
    sites = []
    for name, node in trace.nodes.items():
        if node["type"] != "sample" or node["is_observed"] or site_is_subsample(node) or name in exclude:
            continue
        fn = node["fn"]
        if fn.support.is_discrete:
            raise UnsupportedModelError(f"the model's latent site {name!r} is discrete ({type(fn).__name__}); "
                                      "pyro_subnet's methods need continuous latent sites.")
        value = node["value"].detach()
        shape = value.shape[len(value.shape) - len(fn.batch_shape + fn.event_shape):]
        sites.append(_Site(name, shape, _unchecked(fn), biject_to(fn.support), value))
    return sites


def _to_unconstrained(site: _Site, value: torch.Tensor) -> torch.Tensor:
    return value if _is_real(site.fn.support) else site.transform.inv(value)


def _site_log_prob(fn, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``log p(value)`` summed over the site's own dimensions: ``(*lead, *shape) -> (*lead,)``."""
    lp = fn.log_prob(value)
    lead = value.dim() - len(shape)
    return lp.reshape(*value.shape[:lead], -1).sum(-1) if lp.dim() > lead else lp


def _site_term(site: _Site, fn, u: torch.Tensor) -> torch.Tensor:
    """The site's log prior at the unconstrained value ``u`` under the prior ``fn``, with the
    log-Jacobian of its transform: ``(*lead, *shape) -> (*lead,)``."""
    if _is_real(site.fn.support):
        return _site_log_prob(fn, u, site.shape)
    v = site.transform(u)
    jac = site.transform.log_abs_det_jacobian(u, v)
    lead = u.dim() - len(site.shape)
    jac = jac.reshape(*u.shape[:lead], -1).sum(-1) if jac.dim() > lead else jac
    return _site_log_prob(fn, v, site.shape) + jac


def _normal_params(site: _Site):
    """``(loc, scale)`` of a real site whose prior is a fixed Normal, else ``None``."""
    base = _base(site.fn)
    if not isinstance(base, dist.Normal) or not _is_real(site.fn.support):
        return None
    return base.loc.expand(site.shape), base.scale.expand(site.shape)


class NetworkOutput(NetworkFunction):
    """A model's own :class:`~pyro_subnet.nn.FunctionalNet` (``model.network``), with the output as
    the observed distribution holds it (normalised logits for a ``Categorical``)."""

    def __init__(self, net: FunctionalNet, normalise: bool):
        self.net = net
        self.normalise = normalise
        self.is_pyro = net.is_pyro
        self.min_rows = 1
        self._init_function(net.layout)
        # the output width is the net's: share the input-shape probes of check_data with it
        self._probe_cache = net.__dict__.setdefault("_probe_cache", {})

    @property
    def module(self) -> nn.Module:
        return self.net.module

    def initial_values(self):
        return self.net.initial_values()

    def training(self):
        return self.net.training()

    def mode(self):
        return self.net.mode()

    def __call__(self, params, x):
        f = self.net(params, x)
        return torch.log_softmax(f, -1) if self.normalise else f


class ModelNetwork(NetworkFunction):
    """``f(x; theta)`` of any model: the model run on ``x`` with its latent sites set (the noise
    site at the bridge's current value), the observed distribution's parameter read off."""

    is_pyro = True

    def __init__(self, bridge: "ModelBridge", layout: SiteLayout):
        self.bridge = bridge
        self.min_rows = bridge.subsample_size or 1
        self._init_function(layout)

    @property
    def module(self) -> nn.Module:
        model = self.bridge.model
        return model if isinstance(model, nn.Module) else nn.Module()

    def initial_values(self):
        return self.bridge.initial_values()

    def __call__(self, params, x):
        bridge = self.bridge
        values = bridge.constrained(params)
        if bridge.noise_site is not None:
            site = bridge.noise
            values[bridge.noise_site] = torch.full(site.shape, float(bridge.likelihood.noise_scale), dtype=x.dtype,
                                                   device=x.device)
        with self.mode(), pyro.validation_enabled(False), poutine.block():
            size = bridge.subsample_size
            if size is None:
                return self._run(values, x)
            n = x.shape[0]
            if n < size:
                raise ValueError(f"the model's plate {bridge.data_plate!r} subsamples {size} examples, but x has only "
                                 f"{n}; Pyro refuses a subsample larger than the data.")
            outs, done = [], 0
            while done < n:
                start = min(done, n - size)          # the last window overlaps the one before
                idx = torch.arange(start, start + size, device=x.device)
                f = self._run({**values, bridge.data_plate: idx}, x)
                outs.append(f[done - start:])
                done = start + size
            return torch.cat(outs)

    def _run(self, values, x):
        catch = _CatchObserved(self.bridge.obs_name)
        with _SetSiteValues(values), catch:
            self.bridge.model(x)
        if catch.fn is None:
            raise RuntimeError(f"the model did not sample its observed site {self.bridge.obs_name!r} when run on x "
                               "alone; pyro_subnet calls model(x) to evaluate the network.")
        return observed_parameter(catch.fn)


def _own_network(model) -> Optional[FunctionalNet]:
    """``model.network`` where the model offers a FunctionalNet (one that exists already)."""
    try:
        net = model.network
    except (AttributeError, RuntimeError):
        return None
    return net if isinstance(net, FunctionalNet) else None


def _reference_tensor(model) -> Optional[torch.Tensor]:
    """A floating tensor of the model, for the dtype and device of converted arrays."""
    ref = reference_tensor(_own_network(model))
    if ref is not None:
        return ref
    if isinstance(model, nn.Module):
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                return t
    return None


class ModelBridge:
    """The view of a Pyro model that every method uses (see the module docstring).

    :param model: a Pyro model ``model(x, y=None)`` with one observed site inside a data plate.
    :param x: inputs ``(N, ...)`` (a few examples suffice: the model is traced on them).
    :param lazy_priors: decide whether each site's prior depends on the other latents (a second
        prior draw of the model; what the prior densities, prior draws and the Gaussian view of the
        prior rely on) when first asked instead of now. For a caller that only evaluates the network,
        such as the analytic predictive, which never asks. The later draw runs the model as it is
        then (its modules' modes, e.g. inside a training context that updates running statistics),
        so methods that use the prior keep the default.

    The bridge holds the current value of a learned noise scale (``likelihood.noise_scale``):
    a method that fits it writes it there, and the network is evaluated at it.
    """

    def __init__(self, model, x, lazy_priors: bool = False):
        if not callable(model):
            raise TypeError(f"expected a Pyro model (a callable such as a PyroModule), got {type(model).__name__}.")
        self.model = model
        x = as_tensor(x, "x", _reference_tensor(model))
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"x must have a leading data dimension with at least one example, got shape {tuple(x.shape)}.")
        with torch.random.fork_rng():   # a prior draw, leaving the user's random stream where it was
            trace = self._trace(x)
            # the seed of a second prior draw, made only where one is needed (:meth:`_second_trace`)
            self._second_seed = int(torch.randint(2 ** 62, ()))
        self._traced_x = x
        obs = self._find_observed(trace, x.shape[0])
        self.obs_name = obs
        node = trace.nodes[obs]
        kind = _kind(node["fn"])
        if kind is None:
            raise UnsupportedModelError(
                f"the observed site {obs!r} is a {type(_base(node['fn'])).__name__}; pyro_subnet supports Normal "
                "(regression), Categorical and Bernoulli (classification on logits) observations.")
        plates = [f for f in node["cond_indep_stack"] if f.vectorized]
        data = min(plates, key=lambda f: f.dim) if plates else None   # (the outermost-right plate: the data)
        self.data_plate = None if data is None else data.name
        full = getattr(data, "full_size", None)
        self.subsample_size = data.size if data is not None and full is not None and data.size != full else None
        self._example_x = x[:self.subsample_size or 1]     # enough to run the model (priors, prior draws)

        latents = _latent_sites(trace, exclude={obs})
        self.noise_site, self.noise = None, None
        fixed_noise = None
        # a second prior draw: it tells a noise scale apart from what depends on the weights, and
        # whether the priors depend on other latents
        other = self._second_trace() if kind == "regression" or not lazy_priors else None
        if kind == "regression":
            scale, scale2 = _observed_scale(node["fn"]), _observed_scale(other.nodes[obs]["fn"])
            for site in latents:
                value2 = other.nodes[site.name]["value"] if site.name in other.nodes else None
                if site.value.numel() == 1 and not _is_real(site.fn.support) and value2 is not None and torch.allclose(
                        scale, site.value.reshape(()).to(scale)) and torch.allclose(scale2, value2.reshape(()).to(scale2)):
                    self.noise_site, self.noise = site.name, site
                    break
            if self.noise_site is None:
                if not torch.allclose(scale, scale2):
                    raise UnsupportedModelError(
                        f"the noise scale of the observed site {obs!r} depends on latent sites without being one of "
                        "them; pyro_subnet reads a noise scale that is a constant or a latent site itself, e.g. "
                        "sigma = pyro.sample('sigma', dist.HalfNormal(1.)); dist.Normal(f, sigma).")
                if not torch.allclose(scale, scale.reshape(-1)[0].expand_as(scale)):
                    raise UnsupportedModelError(
                        f"the observed site {obs!r} has a noise scale that varies from example to example; "
                        "pyro_subnet supports one noise scale, a constant or a latent site such as "
                        "sigma = pyro.sample('sigma', dist.HalfNormal(1.)).")
                fixed_noise = float(scale.reshape(-1)[0])
        self.sites = [s for s in latents if s.name != self.noise_site]
        if not self.sites:
            raise UnsupportedModelError("the model has no latent weight sites: give the network's weights priors with "
                             "PyroSample (or wrap a plain network with ps.nn.BayesianNet).")
        self._sites = {s.name: s for s in self.sites}
        self.likelihood = self._make_likelihood(kind, fixed_noise)
        self.network = self._make_network(kind, trace, x)
        self.layout = self.network.layout
        if isinstance(self.network, ModelNetwork):
            f = observed_parameter(node["fn"])
            if f.shape[0] == x.shape[0]:    # the trace ran the network on x: the probe check_data would make
                self.network._probe_cache = {(tuple(x.shape[1:]), x.dtype, x.device.type): int(f.shape[-1])}
        self._static_value = None if lazy_priors else self._priors_are_static(other)
        self._prior_cache = {}

    # ----------------------------------------------------------------------------------------
    # discovery
    @staticmethod
    def _find_observed(trace, n: int) -> str:
        """The one sample site inside a data plate of the traced batch's size."""
        candidates = []
        for name, node in trace.nodes.items():
            if node["type"] != "sample" or site_is_subsample(node):
                continue
            frames = [f for f in node["cond_indep_stack"] if f.vectorized]
            if any((getattr(f, "full_size", None) or f.size) == n or f.size == n for f in frames):
                candidates.append(name)
        if len(candidates) != 1:
            named = [n for n in candidates if n == "obs"]
            if len(named) == 1:
                return named[0]
            raise UnsupportedModelError(
                "pyro_subnet needs a model with one observed site inside pyro.plate('data', N) (N = the number "
                f"of examples); tracing the model on {n} examples found "
                + (f"{len(candidates)} such sites {candidates}" if candidates else "none")
                + ". Write the likelihood as: with pyro.plate('data', x.shape[0]): pyro.sample('obs', "
                  "dist.Normal(f, sigma) or dist.Categorical(logits=f), obs=y).")
        return candidates[0]

    def _make_likelihood(self, kind: str, fixed_noise: Optional[float]) -> Likelihood:
        own = getattr(self.model, "likelihood", None)
        if isinstance(own, Likelihood):
            if own.name != kind:
                raise ValueError(f"model.likelihood is {own!r} but the observed site {self.obs_name!r} is {kind}.")
            return own
        if kind == "classification":
            return Categorical()
        if kind == "binary":
            return Bernoulli()
        if self.noise_site is not None:
            lik = Normal(float(self.noise.value.reshape(())))
            lik.learn_noise = True
            return lik
        return Normal(fixed_noise)

    def _make_network(self, kind: str, trace, x) -> NetworkFunction:
        own = _own_network(self.model)
        shapes = {s.name: s.shape for s in self.sites}
        if (isinstance(own, FunctionalNet) and own.layout.shapes == shapes
                and all(_is_real(s.fn.support) for s in self.sites)):
            return NetworkOutput(own, normalise=kind == "classification")
        return ModelNetwork(self, SiteLayout([(s.name, s.shape) for s in self.sites]))

    def _trace(self, x):
        """A trace of ``model(x)`` (a prior draw); a model that cannot run on ``x`` alone is not one
        the bridge reads."""
        try:
            with pyro.validation_enabled(False), poutine.block():
                return poutine.trace(self.model).get_trace(x)
        except TypeError as e:
            raise UnsupportedModelError(f"the model cannot be run as model(x) ({e}); pyro_subnet evaluates a "
                                        "Bayesian network as model(x) with the targets y optional.") from e

    def _second_trace(self):
        """A second prior draw of the model on the traced inputs, made where it is needed (telling a
        noise site apart, :attr:`_static`): from a seed drawn after the first draw, so that it
        differs from the first even where the user reseeds before each bridge, and is the same draw
        each time it is made."""
        with torch.random.fork_rng():      # (forks the CPU and CUDA generators, the ones seeded here)
            torch.default_generator.manual_seed(self._second_seed)
            if torch.cuda.is_available():
                torch.cuda.manual_seed_all(self._second_seed)
            return self._trace(self._traced_x)

    @property
    def _static(self) -> bool:
        """Whether each site's prior is the same whatever the other latents are
        (:meth:`_priors_are_static`; decided on first use under ``lazy_priors``)."""
        if self._static_value is None:
            self._static_value = self._priors_are_static(self._second_trace())
        return self._static_value

    def _priors_are_static(self, other) -> bool:
        """Whether each site's prior is the same whatever the other latents are: the priors of a
        second prior draw give every site the same log density as the first trace's priors."""
        for site in self.sites + ([self.noise] if self.noise is not None else []):
            fn = other.nodes[site.name]["fn"] if site.name in other.nodes else None
            if fn is None:
                return False
            a = _site_log_prob(site.fn, site.value, site.shape)
            b = _site_log_prob(fn, site.value.to(a.device), site.shape)
            if not torch.allclose(a, b, rtol=1e-6, atol=1e-6):
                return False
        return True

    # ----------------------------------------------------------------------------------------
    # values
    def constrained(self, params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Site values from unconstrained ``params`` (``{site: tensor}``)."""
        out = {}
        for name, u in params.items():
            site = self._sites[name]
            out[name] = u if _is_real(site.fn.support) else site.transform(u)
        return out

    def initial_values(self) -> Dict[str, torch.Tensor]:
        """Starting weights: the model's own network's (e.g. pretrained) where it offers one, else
        the draw from the prior made when the model was traced (unconstrained)."""
        if isinstance(self.network, NetworkOutput):
            return self.network.net.initial_values()
        return {s.name: _to_unconstrained(s, s.value).clone() for s in self.sites}

    def initial_theta(self, dtype=None, device=None) -> torch.Tensor:
        return self.layout.flatten(self.initial_values()).to(dtype=dtype, device=device)

    def site_normal(self, name: str):
        """``(loc, scale)`` of a weight site whose prior is a fixed Normal, else ``None``."""
        return _normal_params(self._sites[name]) if self._static else None

    def site_log_prior(self, name: str, u: torch.Tensor) -> torch.Tensor:
        """One weight site's log prior at unconstrained values ``(*lead, *shape)`` (with its
        transform's log-Jacobian); returns ``(*lead,)``."""
        self._require_static("site_log_prior")
        site = self._sites[name]
        return _site_term(site, site.fn, u)

    def transforms(self) -> Dict[str, object]:
        """``{site: constrained -> unconstrained}`` for every latent site that is not real-valued
        (the noise site included), as ``pyro.infer.MCMC`` kernels report them."""
        sites = self.sites + ([self.noise] if self.noise is not None else [])
        return {s.name: s.transform.inv for s in sites if not _is_real(s.fn.support)}

    def site_prior(self, name: str):
        """The traced prior of a site (static priors only)."""
        self._require_static("site_prior")
        return self._sites[name].fn if name in self._sites else self.noise.fn

    def _require_static(self, what: str):
        if not self._static:
            raise NotImplementedError(f"{what}: a site's prior depends on other latent sites (a hierarchical prior); "
                                      "this needs a prior of its own for every weight site.")

    # ----------------------------------------------------------------------------------------
    # densities
    def _normal_terms(self, like: torch.Tensor):
        """``(loc, precision, constant)`` of a prior that is a fixed Normal on every site, or ``None``."""
        key = (like.dtype, like.device)
        if key not in self._prior_cache:
            params = [_normal_params(s) for s in self.sites] if self._static else [None]
            if any(p is None for p in params):
                self._prior_cache[key] = None
            else:
                loc = torch.cat([p[0].reshape(-1) for p in params]).to(like)
                scale = torch.cat([p[1].reshape(-1) for p in params]).to(like)
                const = float(-(torch.log(scale.double()).sum() + 0.5 * math.log(2 * math.pi) * scale.numel()))
                self._prior_cache[key] = (loc, scale.pow(-2), const)
        return self._prior_cache[key]

    def log_prior(self, theta: torch.Tensor) -> torch.Tensor:
        """``log p(theta)`` of the weight sites for unconstrained ``theta (*batch, D)``, with the
        log-Jacobian of each site's transform; returns ``(*batch,)``. Exactly the model's prior
        (closed form where every site is a fixed Normal; from traces of the model where a site's
        prior depends on other latents)."""
        terms = self._normal_terms(theta)
        if terms is not None:
            loc, prec, const = terms
            r = theta - loc
            return const - 0.5 * (prec * r * r).sum(-1)
        values = self.layout.unflatten(theta)
        if not self._static:
            return self._traced_log_prior(values, theta.shape[:-1])
        return sum(_site_term(s, s.fn, values[s.name]) for s in self.sites)

    def noise_log_prior(self, log_noise: torch.Tensor) -> torch.Tensor:
        """``log p(sigma) + log sigma`` of the noise site at ``sigma = exp(log_noise)`` (the prior
        of the unconstrained ``log sigma``), elementwise."""
        site = self.noise
        sigma = log_noise.exp()
        return site.fn.log_prob(sigma.reshape(sigma.shape + site.shape)).reshape(sigma.shape) + log_noise

    def _traced_sites(self, values: Dict[str, torch.Tensor]):
        """One trace of the model with the weight sites (constrained ``values``) and the noise set."""
        if self.noise_site is not None:
            ref = next(iter(values.values()))
            values = {**values, self.noise_site: torch.full(self.noise.shape, float(self.likelihood.noise_scale),
                                                            dtype=ref.dtype, device=ref.device)}
        with pyro.validation_enabled(False), poutine.block():
            model = _CatchObserved(self.obs_name)(_SetSiteValues(values)(self.model))
            return poutine.trace(model).get_trace(self._example_x)

    def _traced_log_prior(self, values, batch) -> torch.Tensor:
        """The log prior from traces of the model, for priors that depend on other latents."""
        def one(params):
            tr = self._traced_sites(self.constrained(params))
            return sum(_site_term(s, tr.nodes[s.name]["fn"], params[s.name]) for s in self.sites)
        flat = {n: v.reshape(-1, *self.layout.shapes[n]) for n, v in values.items()}
        num = next(iter(flat.values())).shape[0]
        try:
            out = vmap(one)(flat)
        except RuntimeError as error:
            if not _is_missing_batching_rule(error):
                raise
            out = torch.stack([one({n: v[i] for n, v in flat.items()}) for i in range(num)])
        return out.reshape(batch)

    def log_likelihood(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Pointwise ``log p(y_n | x_n, theta)`` for flat weights ``(*batch, D)``; returns
        ``(*batch, N)``. No validation: call :meth:`check` once first."""
        return self.likelihood.log_prob(self.network.flat_batched(theta, x), y)

    # ----------------------------------------------------------------------------------------
    # Gaussian view of the prior (for the Laplace guides)
    def prior_precision(self, dtype=None, device=None) -> torch.Tensor:
        """Per-weight precision ``(D,)`` of the Gaussian the Laplace guides use for the model's prior:
        ``1 / scale^2`` for a Normal prior (exact), ``1 / variance`` of any other prior with a
        finite variance on a real site (the Gaussian with the prior's own variance: e.g.
        ``1 / (2 b^2)`` for Laplace(0, b) weights)."""
        parts = []
        for site in self.sites:
            if not self._static or not _is_real(site.fn.support):
                raise ValueError(
                    f"the prior of site {site.name!r} ({type(_base(site.fn)).__name__} on {site.fn.support}) has no "
                    "Gaussian equivalent here; pass prior_precision= (a number, or a dict of site patterns to numbers).")
            normal = _normal_params(site)
            if normal is not None:
                prec = normal[1].pow(-2)
            else:
                try:
                    var = site.fn.variance.expand(site.shape)
                except (NotImplementedError, RuntimeError):
                    var = torch.full(site.shape, float("nan"))
                if not (torch.isfinite(var).all() and (var > 0).all()):
                    raise ValueError(
                        f"the {type(_base(site.fn)).__name__} prior of site {site.name!r} has no finite variance; pass "
                        "prior_precision= (a number, or a dict of site patterns to numbers).")
                prec = 1.0 / var
            parts.append(prec.reshape(-1))
        return torch.cat(parts).to(dtype=dtype or torch.get_default_dtype(), device=device)

    def sample_prior(self, num_samples: int, dtype=None, device=None) -> torch.Tensor:
        """``(num_samples, D)`` unconstrained draws from the prior (torch's global RNG; ancestral
        sampling through traces of the model where priors depend on other latents)."""
        if self._static:
            draws = {s.name: _to_unconstrained(s, s.fn.sample((num_samples,))) for s in self.sites}
        else:
            with pyro.validation_enabled(False), poutine.block():
                traces = [poutine.trace(self.model).get_trace(self._example_x) for _ in range(num_samples)]
            draws = {s.name: torch.stack([_to_unconstrained(s, t.nodes[s.name]["value"]) for t in traces])
                     for s in self.sites}
        return self.layout.flatten(draws).to(dtype=dtype, device=device)

    # ----------------------------------------------------------------------------------------
    def check(self, x, y=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The data as tensors, checked against this model (:func:`~pyro_subnet.nn.validation.check_data`)."""
        return check_data(x, y, self.likelihood.name, network=self.network)

    def __repr__(self):
        noise = f", noise site {self.noise_site!r}" if self.noise_site else ""
        return (f"ModelBridge({type(self.model).__name__}: {len(self.sites)} weight sites, D={self.layout.dim}, "
                f"{self.likelihood!r} at {self.obs_name!r}{noise})")


class BatchAwareModel:
    """A model as its bridge reads it, written so that its latent sites may carry leading sample
    dimensions: each site drawn from its own (traced) prior, the network evaluated for every draw
    at once (:meth:`~pyro_subnet.nn.functional.NetworkFunction.batched`), the observation from the
    likelihood, in a data plate over all examples. The same density as the model, so
    ``pyro.infer.Predictive(..., parallel=True)`` and ``arviz.from_pyro`` can vectorise over draws
    even where the user's own forward cannot (``nn.Linear`` takes no batched weights). The bridge is
    built on the first call; a model it cannot read, or whose priors depend on other latents, is
    called as it is.

    :param model: the Pyro model.
    :param bridge: its bridge, where one is built already.
    """

    def __init__(self, model, bridge: Optional["ModelBridge"] = None):
        self.model = model
        self.bridge = bridge
        self._direct = False

    def __call__(self, x, y=None):
        if self.bridge is None and not self._direct:
            try:
                self.bridge = ModelBridge(self.model, x)
                self._direct = not self.bridge._static
            except UnsupportedModelError:
                self._direct = True
        if self._direct:
            return self.model(x, y)
        b = self.bridge
        x, y = b.check(x, y)
        values = {s.name: pyro.sample(s.name, s.fn) for s in b.sites}
        params = {s.name: _to_unconstrained(s, values[s.name]) for s in b.sites}
        shapes = b.layout.shapes
        batch = torch.broadcast_shapes(*(v.shape[: v.dim() - len(shapes[n])] for n, v in params.items()))
        if len(batch) and batch[-1] == 1:      # the data plate's slot (global sites sit outside it)
            batch = batch[:-1]
        noise = None
        if b.noise_site is not None:
            noise = pyro.sample(b.noise_site, b.noise.fn)
            noise = noise.reshape(noise.shape[:noise.dim() - len(b.noise.shape)])
        f = self._outputs(params, x, batch)
        with pyro.plate(b.data_plate or "data", x.shape[0]):
            if noise is not None:
                pad = [1] * (f.dim() - 1 - noise.dim())
                fn = b.likelihood.distribution(f, noise_scale=noise.reshape(*noise.shape, *pad))
            else:
                fn = b.likelihood.distribution(f)
            pyro.sample(b.obs_name, fn, obs=y)
        return f

    def _outputs(self, params, x, batch) -> torch.Tensor:
        """``f`` of shape ``(*batch, N, O)`` for the (unconstrained) site values ``params``."""
        return self.bridge.network.batched(params, x, batch)

    def __repr__(self):
        return f"{type(self).__name__}({type(self.model).__name__})"


def check_model(model, who: str) -> None:
    """A ``TypeError`` naming the fix, before any work, for what is not a Pyro model at all."""
    if isinstance(model, nn.Module) and not isinstance(model, PyroModule):
        raise TypeError(f"{who}: {type(model).__name__} is a plain torch module, not a Pyro model; give its weights "
                        "priors with ps.nn.BayesianNet(net, likelihood=...), or write a PyroModule with PyroSample "
                        "weights and an observed site.")
    if not callable(model):
        raise TypeError(f"{who} needs a Pyro model (a callable such as a PyroModule), got {type(model).__name__}.")


def as_bridge(model, x) -> ModelBridge:
    """``model`` itself if it is a :class:`ModelBridge`, else the bridge of ``model`` traced on ``x``."""
    return model if isinstance(model, ModelBridge) else ModelBridge(model, x)
