"""What every linearised-Laplace guide shares: the fit driver, the Pyro guide shell, the
predictives and the state.

A :class:`LinearisedLaplaceGuide` keeps all weights at the MAP :math:`\\hat\\theta` except ``k``
coordinates ``S`` (the subnetwork), over which it holds some Gaussian. A concrete guide only says

* how to build that Gaussian from the data (:meth:`_fit_posterior`),
* how to draw subnetwork values inside a Pyro trace (:meth:`_sample_subnet`),
* how to factor the function-space covariance, :math:`F F^\\top = J_S \\Sigma_S J_S^\\top`
  (:meth:`_function_factor`), and the marginal standard deviations (:meth:`_marginal_std`).

Everything else is here: MAP fitting (or taking a trained network, ``map_steps=0``), data
handling (tensors or a DataLoader), ``forward`` (one ``pyro.sample`` per weight site, so
``pyro.infer.Predictive`` works sequentially and vectorised), ``median``/``quantiles``, the GLM
predictive (:mod:`.glm`), the sampled-network predictive, and ``state_dict`` round trips
(buffers are resized on load, so a fresh guide accepts a fitted guide's state).

Under ``torch.distributed`` (:mod:`pyro_subnet.infer.distributed`) every rank calls ``fit`` with
the whole data set: the MAP is data-parallel (:func:`~pyro_subnet.infer.fit_map`), rank 0 selects
the subnetwork and broadcasts it, the guides sum their curvature over each rank's share of the
data with ``all_reduce``, and the fitted buffers are broadcast from rank 0 at the end, so every
rank holds the same guide, equal to the single-process one.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoGuide

from ... import metrics
from ...data.batches import is_array, iter_batches, tensors
from ...nn.bridge import BatchAwareModel, ModelBridge, _own_network, check_model
from ...nn.validation import check_positive_int
from .. import distributed, links
from ..curvature import jvp
from ..map import fit_map, residual_sum_of_squares
from . import glm
from . import prior as prior_lib
from .subnet_selection import All, PredictiveVariance


class LinearisedModel(BatchAwareModel):
    """The model with its network linearised at a Laplace guide's MAP: the same latent sites and
    priors, the observation from :math:`f(x; \\hat\\theta) + J_S(x)(\\theta_S - \\hat\\theta_S)`: the
    generalised linear model whose posterior the guide holds (Immer et al., 2021), batch-aware
    over draws.

    :param guide: a fitted :class:`LinearisedLaplaceGuide`.
    """

    def __init__(self, guide: "LinearisedLaplaceGuide"):
        super().__init__(guide.model, guide.bridge)
        self.guide = guide

    def _outputs(self, params, x, batch):
        guide = self.guide
        theta = self.bridge.layout.flatten(params)                   # (*batch, [1,] D)
        delta = theta[..., guide.subnet_indices] - guide.loc[guide.subnet_indices]
        return guide.linearised_output(delta.reshape(*batch, delta.shape[-1]), x.to(guide.loc.device))


def broadest_within(precisions: Sequence[float], scores: Sequence[float], tolerance: float) -> int:
    """The rule of ``prior_precision="validation"``: the index of the smallest precision (the
    broadest posterior) whose held-out NLL is at most ``best + tolerance * |best|``.

    Held-out data from the training distribution can say that a posterior is too wide (its NLL
    rises steeply), but hardly that it is too narrow: every precision from the MAP end down to
    where the NLL starts to rise predicts such data about equally well, and the argmin among
    them is decided by a handful of points. Off that distribution the choice matters (a
    narrow posterior is as confident as the MAP), so among the precisions the held-out data
    cannot tell apart, a positive ``tolerance`` takes the broadest. ``tolerance=0`` is the plain
    argmin (Daxberger et al.'s grid search)."""
    best = min(scores)
    bound = best + tolerance * abs(best)
    admissible = [i for i, s in enumerate(scores) if s <= bound]
    return min(admissible, key=lambda i: precisions[i])


class LinearisedLaplaceGuide(AutoGuide):
    """Base class of the Laplace guides (see the module docstring).

    :param model: a Pyro model whose weights are latent sites and whose likelihood is one
        observed site in a data plate (a user's PyroModule, or :class:`~pyro_subnet.nn.BayesianNet`;
        see :class:`~pyro_subnet.nn.ModelBridge`), with its own priors. A latent noise scale
        (e.g. ``sigma = pyro.sample("sigma", dist.HalfNormal(1.))``) is not part of the Laplace
        posterior: the guides tune it by the evidence (from its MAP) and hold it as a point.
    :param map_steps: Adam steps to find the MAP in :meth:`fit`; ``0`` takes the network's own
        weights as the MAP (an already trained network).
    :param map_lr: Adam learning rate.
    :param batch_size: mini-batch size for the MAP and for curvature accumulation.
    :param progress: show progress bars.
    :param predictive: ``"glm"`` or ``"nn"``: what :meth:`forward` gives ``pyro.infer.Predictive``.
    :param validation_tolerance: with ``prior_precision="validation"``, how much worse (relative)
        than the best held-out NLL a broader posterior may be and still be chosen
        (:func:`broadest_within`). The default ``0`` takes the argmin, which is never much worse
        than the MAP in distribution; a positive value trades some of that for a broader
        posterior, which matters off-distribution but is a bet a small validation split
        cannot check (``benchmarks/prior_tuning.py`` measures both).
    """

    _state_buffers: Sequence[str] = ("loc", "subnet_indices")

    def __init__(self, model, map_steps: int = 2000, map_lr: float = 1e-2, batch_size: int = 256,
                 progress: bool = True, predictive: str = "glm", validation_tolerance: float = 0.0):
        check_model(model, type(self).__name__)
        if not (isinstance(validation_tolerance, (int, float)) and validation_tolerance >= 0):
            raise ValueError(f"validation_tolerance must be a number >= 0, got {validation_tolerance!r}.")
        if predictive not in ("glm", "nn"):
            raise ValueError(f"predictive must be 'glm' (the linearised network) or 'nn' (the network at sampled "
                             f"weights), got {predictive!r}.")
        if not (isinstance(map_steps, int) and map_steps >= 0):
            raise ValueError(f"map_steps must be a non-negative integer, got {map_steps!r}.")
        batch_size = check_positive_int(batch_size, "batch_size")
        super().__init__(model)
        self.predictive = predictive
        self.validation_tolerance = float(validation_tolerance)
        self.map_steps = map_steps
        self.map_lr = map_lr
        self.batch_size = batch_size
        self.progress = progress
        self.register_buffer("loc", torch.empty(0))
        self.register_buffer("subnet_indices", torch.empty(0, dtype=torch.long))
        # The Gaussian likelihood's noise scale at the end of fit: a learned one lives in the
        # model, so the guide keeps a copy that load_state_dict puts back into a fresh model.
        self.register_buffer("noise_scale", torch.empty(0))
        self.bridge: Optional[ModelBridge] = None     # built from the model on the first data seen

    # ------------------------------------------------------------------------------------------
    # subclass hooks
    def _fit_posterior(self, theta: torch.Tensor, data, x: torch.Tensor, y: torch.Tensor) -> None:
        raise NotImplementedError

    def _sample_subnet(self) -> torch.Tensor:
        """Inside a Pyro trace: subnetwork values of shape ``(*batch, k)``."""
        raise NotImplementedError

    def _function_factor(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``f(x; loc)`` of shape ``(N, O)`` and ``F`` of shape ``(N, O, r)``."""
        raise NotImplementedError

    def _marginal_std(self) -> torch.Tensor:
        """Marginal posterior standard deviations of the subnetwork weights, ``(k,)``."""
        raise NotImplementedError

    def _sample_deltas(self, num_samples: int, generator=None) -> torch.Tensor:
        """``(num_samples, k)`` draws of ``theta_S - loc_S`` outside any trace."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------
    # shared by the guides: the prior precision spec and the subnetwork
    _default_subnet = "greedy"   # what subnet=None means: a PredictiveVariance subnetwork, or "all"

    def _prior_full(self, dtype, device) -> torch.Tensor:
        """Per-weight prior precision over all ``D`` weights (used by selection and as the
        starting point of tuning): a given number or dict, else the Gaussian of the model's own
        prior (:meth:`~pyro_subnet.nn.ModelBridge.prior_precision`)."""
        spec = self.prior_precision_spec
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return torch.full((self.num_weights,), float(spec), dtype=dtype, device=device)
        if isinstance(spec, dict):
            everything = torch.arange(self.num_weights, device=device)
            return prior_lib.expand_prior_precision(spec, self.bridge.layout, everything,
                                                    torch.ones(self.num_weights, dtype=dtype, device=device))
        try:
            return self.bridge.prior_precision(dtype=dtype, device=device)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}: {e}") from None

    def _select(self, theta, data, prior_full) -> torch.Tensor:
        if distributed.is_active() and not isinstance(self.subnet, torch.Tensor):
            # Selection may be random or sensitive to rounding: rank 0 decides for everyone.
            idx = self._select_here(theta, data, prior_full) if distributed.rank() == 0 else None
            return distributed.broadcast_object(idx).to(theta.device)
        return self._select_here(theta, data, prior_full)

    def _select_here(self, theta, data, prior_full) -> torch.Tensor:
        subnet = self.subnet
        if subnet is None:
            subnet = PredictiveVariance(min(1000, self.num_weights)) if self._default_subnet == "greedy" else All()
        if isinstance(subnet, torch.Tensor):
            idx = subnet.to(device=theta.device, dtype=torch.long).reshape(-1)
            if idx.numel() == 0 or idx.min() < 0 or idx.max() >= self.num_weights:
                raise ValueError(f"subnet: indices must be a non-empty LongTensor in [0, {self.num_weights}).")
            if torch.unique(idx).numel() != idx.numel():
                raise ValueError("subnet: the indices contain duplicates.")
            return idx
        if not hasattr(subnet, "select"):
            raise TypeError(f"subnet must be a ps.subnet strategy or a LongTensor of indices, got {subnet!r}.")
        return subnet.select(self.bridge, theta, data, prior_precision=prior_full,
                             progress=self._fit_progress).to(theta.device)

    def _log_lik(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:math:`\\sum_n \\log p(y_n \\mid x_n, \\theta)` at ``theta`` (at the MAP: the data term of the
        Laplace evidence), in mini-batches over this rank's share of the data (all of it in one
        process), all-reduced."""
        total = theta.new_zeros(())
        x, y, _ = distributed.local_share(x, y)
        with torch.no_grad():
            for xb, yb in iter_batches((x, y), self.batch_size, device=theta.device):
                total = total + self.bridge.log_likelihood(theta, xb, yb).sum()
        return distributed.all_reduce_sum(total)

    # ------------------------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        return self.loc.numel() > 0

    def _check_fitted(self):
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__}: call guide.fit(x, y) (or load_state_dict) first.")

    @property
    def num_weights(self) -> int:
        return self.bridge.layout.dim

    def _ensure_bridge(self, x) -> ModelBridge:
        """The model's bridge, built on the first data the guide sees (a guide loaded from a state
        dict gets its learned noise scale back then)."""
        if self.bridge is None:
            self.bridge = ModelBridge(self.model, x)
            lik = self.bridge.likelihood
            if self.noise_scale.numel() and getattr(lik, "learn_noise", False):
                lik.set_noise_scale(float(self.noise_scale))
        return self.bridge

    def fit(self, x, y=None, progress: Optional[bool] = None, map_theta: Optional[torch.Tensor] = None,
            validation=None):
        """Fit the posterior: MAP (unless ``map_steps=0`` or ``map_theta`` is given), then the
        guide's own steps.

        :param x: training inputs (a tensor, NumPy array or list) or a DataLoader of ``(x, y)`` batches.
        :param y: training targets (omit with a DataLoader).
        :param map_theta: flat MAP weights ``(D,)`` found elsewhere (skips the MAP fit).
        :param validation: held-out ``(x_val, y_val)``, not part of the training data, for
            ``prior_precision="validation"`` (the precision whose GLM predictive has the lowest
            NLL there).
        :returns: ``self``.
        """
        progress = self.progress if progress is None else progress
        if self.prior_precision_spec == "validation" and validation is None:
            raise ValueError(f"{type(self).__name__}: prior_precision='validation' tunes the prior on held-out data; "
                             "pass fit(x, y, validation=(x_val, y_val)).")
        if is_array(x):
            if y is None:
                raise ValueError("fit(x, y): the targets y are missing.")
            x, y = self._ensure_bridge(x).check(x, y)
            data = (x, y)
        else:
            if y is not None:
                raise ValueError("fit: pass either tensors (x, y) or one DataLoader, not both.")
            if distributed.is_active() and type(getattr(x, "sampler", None)).__name__ == "DistributedSampler":
                raise ValueError("fit: under torch.distributed give every rank the whole data set (no "
                                 "DistributedSampler); the guide shards it between the ranks itself.")
            data = x
            x, y = tensors(data, targets=True, what="fit")
            x, y = self._ensure_bridge(x).check(x, y)
        if map_theta is not None:
            if map_theta.shape != (self.num_weights,):
                raise ValueError(f"fit: map_theta must have shape ({self.num_weights},), got {tuple(map_theta.shape)}.")
            theta = map_theta.to(dtype=x.dtype, device=x.device)
            lik = self.bridge.likelihood
            if getattr(lik, "learn_noise", False) and self.bridge.noise_site is not None:
                # The noise that goes with given weights: its maximum-likelihood value, the root
                # mean squared residual (the guide then tunes it by the evidence from there).
                sse = residual_sum_of_squares(self.bridge.network, theta, data, self.batch_size)
                lik.set_noise_scale(max((sse / y.numel()) ** 0.5, 1e-6))
        elif self.map_steps > 0:
            theta = fit_map(self.bridge, x, y, num_steps=self.map_steps, lr=self.map_lr,
                            batch_size=self.batch_size, progress=progress).theta
        else:
            theta = self.bridge.initial_theta(dtype=x.dtype, device=x.device)
        self._fit_progress = progress
        self._validation = None if validation is None else tuple(
            t.to(theta.device) for t in self.bridge.check(*validation))
        self._fit_posterior(theta.detach(), data, x, y)
        noise = getattr(self.bridge.likelihood, "noise_scale", None)
        if noise is not None:
            self.noise_scale = torch.tensor(float(noise), dtype=torch.float64, device=self.loc.device)
        if distributed.is_active():
            # The ranks computed the same numbers from all-reduced sums; make them bitwise equal.
            for name in self._state_buffers_all():
                distributed.broadcast(getattr(self, name))
        return self

    def _state_buffers_all(self):
        return [n for n, b in self._buffers.items() if isinstance(b, torch.Tensor) and b.numel() > 0]

    # ------------------------------------------------------------------------------------------
    # Pyro guide interface
    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        latent = {n for n, _ in self.prototype_trace.iter_stochastic_nodes()}
        missing = [n for n in self.bridge.layout.names if n not in latent]
        if missing:
            raise ValueError(
                f"{type(self).__name__}: the model has no latent sample sites {missing}; the guide "
                "draws the network's weight sites and expects the model to sample them."
            )

    def _full_theta(self, sub_values: torch.Tensor) -> torch.Tensor:
        """Place subnetwork values ``(*batch, k)`` into copies of the MAP, ``(*batch, D)``."""
        batch = sub_values.shape[:-1]
        theta = self.loc.to(sub_values.dtype).expand(*batch, self.loc.shape[-1]).clone()
        return theta.index_copy(-1, self.subnet_indices, sub_values)

    def forward(self, *args, **kwargs) -> Dict[str, torch.Tensor]:
        """Draw every latent site: subnetwork coordinates from the posterior, the rest at the MAP
        (a noise site at its tuned value). Given the model's inputs (as ``pyro.infer.Predictive``
        passes them) and ``predictive="glm"``, also draw the observed site from the linearised
        network, :math:`y \\sim p(y \\mid f(x; \\hat\\theta) + J_S(x)(\\theta_S - \\hat\\theta_S))` (a JVP for
        every draw at once), so that ``Predictive(model, guide=guide)`` returns the GLM predictive
        (the site is auxiliary: Predictive conditions the model on it; ArviZ conversions skip it).
        ``predictive="nn"`` leaves the observation to the model: its network at the sampled weights."""
        self._check_fitted()
        x = args[0] if args else kwargs.get("x")
        if self.bridge is None:
            if x is None:
                raise ValueError(f"{type(self).__name__}: call the guide with the model's inputs the first time.")
            self._ensure_bridge(x)
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        sub = self._sample_subnet()
        theta = self._full_theta(sub)
        layout = self.bridge.layout
        out = {}
        for name, value in self.bridge.constrained(layout.unflatten(theta)).items():
            out[name] = pyro.sample(name, dist.Delta(value, event_dim=len(layout.shapes[name])))
        out.update({n: pyro.sample(n, dist.Delta(v, event_dim=v.dim())) for n, v in self._point_sites().items()})
        if self.predictive == "glm" and x is not None:
            self._sample_observation(sub, x)
        return out

    def _sample_observation(self, sub: torch.Tensor, x) -> None:
        bridge = self.bridge
        if bridge.subsample_size is not None:
            raise ValueError(f"{type(self).__name__}: the model's data plate subsamples; pass pyro.infer.Predictive a "
                             "version of the model over all data (e.g. model.with_subsample_size(None)).")
        x = bridge.check(x)[0].to(self.loc.device)
        f = self.linearised_output(sub - self.loc[self.subnet_indices], x)
        # The examples are one event (no plate in the guide: Predictive then shapes the weight
        # sites as the model's own draws, for models that are not batch-aware too).
        fn = bridge.likelihood.distribution(f).to_event(1)
        pyro.sample(bridge.obs_name, fn, infer={"is_auxiliary": True})

    def linearised_output(self, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The linearised network :math:`f(x; \\hat\\theta) + J_S(x)\\,\\delta` for subnetwork offsets
        ``delta`` of shape ``(*batch, k)``: ``(*batch, N, O)``, one JVP for every offset at once."""
        lead = delta.shape[:-1]
        f, Jv = jvp(self.bridge.network, self.loc, x, delta.reshape(-1, delta.shape[-1]), self.subnet_indices)
        return (f + Jv).reshape(*lead, *f.shape)

    @property
    def predictive_model(self):
        """The model whose observations the guide's draws predict: with ``predictive="glm"`` the
        network linearised at the MAP (:class:`LinearisedModel`, the same sites and priors as the
        model), else the model itself. :func:`pyro_subnet.to_inference_data` evaluates the
        pointwise log-likelihood (hence LOO) through it."""
        self._check_fitted()
        return LinearisedModel(self) if self.predictive == "glm" else self.model

    def _point_sites(self) -> Dict[str, torch.Tensor]:
        """Latent sites the guide holds at a point: the model's noise site, at its tuned value."""
        bridge = self.bridge
        if bridge.noise_site is None:
            return {}
        value = torch.full(bridge.noise.shape, float(bridge.likelihood.noise_scale), dtype=self.loc.dtype,
                           device=self.loc.device)
        return {bridge.noise_site: value}

    def median(self, *args, **kwargs) -> Dict[str, torch.Tensor]:
        """The posterior median (= mean = MAP) of every latent site (the model's own names)."""
        self._check_fitted()
        values = self.bridge.constrained(self.bridge.layout.unflatten(self.loc))
        return {**{n: v.clone() for n, v in values.items()}, **self._point_sites()}

    def quantiles(self, quantiles, *args, **kwargs) -> Dict[str, torch.Tensor]:
        """Marginal quantiles of every weight site, shape ``(len(quantiles), *site_shape)``
        (off the subnetwork all quantiles equal the MAP)."""
        self._check_fitted()
        q = torch.as_tensor(quantiles, dtype=self.loc.dtype, device=self.loc.device).reshape(-1)
        if ((q <= 0) | (q >= 1)).any():
            raise ValueError(f"quantiles must lie strictly between 0 and 1, got {quantiles!r}.")
        std = torch.zeros_like(self.loc).index_copy(0, self.subnet_indices, self._marginal_std())
        z = torch.special.ndtri(q)
        flat = self.loc + z[:, None] * std
        points = {n: v.expand(len(q), *v.shape).clone() for n, v in self._point_sites().items()}
        return {**self.bridge.constrained(self.bridge.layout.unflatten(flat)), **points}

    # ------------------------------------------------------------------------------------------
    # predictives
    def _glm_factor(self, x: torch.Tensor, batch_size: Optional[int] = None):
        batch_size = batch_size or self.batch_size
        fs, Fs = [], []
        for xb, _ in iter_batches(x, batch_size, device=self.loc.device):
            f, F = self._function_factor(xb)
            fs.append(f)
            Fs.append(F)
        return torch.cat(fs), torch.cat(Fs)

    def _glm_classes(self, f: torch.Tensor, F: torch.Tensor, link: str = "gumbel_max", num_samples: int = 100,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Class probabilities of the GLM predictive ``f ~ N(f, F F^T)`` by ``link``."""
        binary = self.bridge.likelihood.name == "binary"
        if link == "gumbel_max":
            return glm.gumbel_max(f, F, binary)
        if link == "probit":
            return glm.probit(f, F, binary)
        if link == "mc":
            return glm.mc_logits(f, F, num_samples, generator, binary=binary)
        raise ValueError(f"predict: link must be 'gumbel_max', 'probit' or 'mc', got {link!r}.")

    def _glm_nll(self, f: torch.Tensor, F: torch.Tensor, y: torch.Tensor) -> float:
        """Mean NLL of the GLM predictive ``N(f, F F^T)`` (the default link; regression: noise
        included) on targets ``y``: the score of ``prior_precision="validation"``."""
        lik = self.bridge.likelihood
        if lik.name == "regression":
            mean, var = glm.regression(f, F, float(lik.noise_scale) ** 2)
            return metrics.nll(mean.reshape(-1), y.reshape(-1), var=var.reshape(-1))
        return metrics.nll(self._glm_classes(f, F), y)

    def _validation_data(self):
        if self._validation is None:
            raise ValueError(f"{type(self).__name__}: prior_precision='validation' needs fit(..., validation=(x_val, y_val)).")
        return self._validation

    def predict(self, x: torch.Tensor, method: str = "glm", link: str = "gumbel_max", num_samples: int = 100,
                observation_noise: bool = True, generator: Optional[torch.Generator] = None):
        """Posterior predictive at ``x``.

        :param method: ``"glm"`` (the linearised network, :math:`f \\sim \\mathcal{N}(f_{MAP},
            J_S \\Sigma_S J_S^\\top)`) or ``"nn"`` (sample weights, run the network).
        :param link: classification with ``"glm"``: ``"gumbel_max"`` (default: from the covariance
            between the logits, close to Monte Carlo; :func:`.glm.gumbel_max`), ``"probit"`` (the
            variances only) or ``"mc"`` (``num_samples`` logit draws; safe with the singular softmax
            logit covariance).
        :param num_samples: draws for ``link="mc"`` and ``method="nn"``.
        :param observation_noise: regression: add the noise variance to the predictive variance.
        :returns: classification: probabilities ``(N, C)`` (a Bernoulli model: ``(N, 2)``, the
            probabilities of 0 and 1); regression: ``(mean, var)``, each ``(N, O)``.
        """
        self._check_fitted()
        x = self._ensure_bridge(x).check(x)[0].to(device=self.loc.device)
        check_positive_int(num_samples, "num_samples")
        lik = self.bridge.likelihood
        binary = lik.name == "binary"
        classification = lik.name == "classification" or binary
        noise_var = float(getattr(lik, "noise_scale", 0.0)) ** 2 if observation_noise else 0.0
        if method == "glm":
            with torch.no_grad():
                f, F = self._glm_factor(x)
            if not classification:
                return glm.regression(f, F, noise_var)
            return self._glm_classes(f, F, link, num_samples, generator)
        if method == "nn":
            deltas = self._sample_deltas(num_samples, generator)
            thetas = self._full_theta(self.loc[self.subnet_indices] + deltas)
            with torch.no_grad():
                f = self.bridge.network.flat_batched(thetas, x)          # (S, N, O)
            if classification:
                return links.probabilities(f, binary).mean(0)
            return f.mean(0), f.var(0, unbiased=False) + noise_var
        raise ValueError(f"predict: method must be 'glm' or 'nn', got {method!r}.")

    # ------------------------------------------------------------------------------------------
    # persistence
    def __getstate__(self):
        # Pyro's AutoGuide.__getstate__ sets self._model = None (on the live guide, too) so that
        # pickles stay small; a fitted Laplace guide is useless without its model (the network
        # it linearises), so the pickle keeps it and only the weak reference to a master guide
        # is dropped, in a copy of the state.
        state = self.__dict__.copy()
        state["master"] = None
        return state

    # state: buffers change shape after fit; a fresh guide takes them as they come. The network's
    # own buffers (BatchNorm's running statistics from the MAP fit) travel with the guide's state
    # under "network_buffers.", since they live in the model, as a learned noise scale does.
    _NETWORK_BUFFERS = "network_buffers."

    def _network_buffers(self):
        own = _own_network(self.model)
        module = own.module if own is not None else self.model
        return dict(module.named_buffers()) if isinstance(module, torch.nn.Module) else {}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, b in self._network_buffers().items():
            destination[prefix + self._NETWORK_BUFFERS + name] = b if keep_vars else b.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in list(self._buffers):
            key = prefix + name
            if key in state_dict and self._buffers[name] is not None:
                self._buffers[name] = torch.empty_like(state_dict[key])
        network = self._network_buffers()
        for name, b in network.items():
            key = prefix + self._NETWORK_BUFFERS + name
            if key in state_dict:
                with torch.no_grad():
                    b.copy_(state_dict[key])
            elif strict:
                missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        ours = prefix + self._NETWORK_BUFFERS
        unexpected_keys[:] = [k for k in unexpected_keys if not (k.startswith(ours) and k[len(ours):] in network)]
        if self.bridge is not None:
            lik = self.bridge.likelihood
            if self.noise_scale.numel() and getattr(lik, "learn_noise", False):
                lik.set_noise_scale(float(self.noise_scale))
