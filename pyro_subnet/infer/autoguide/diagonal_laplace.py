"""AutoDiagonalLaplace: linearised Laplace over every weight with a diagonal GGN, as a Pyro guide."""

from __future__ import annotations

import math
from numbers import Number
from typing import Mapping, Tuple

import pyro
import pyro.distributions as dist
import torch

from ...data.batches import iter_batches
from .. import distributed
from ..analytic.posterior import FlatPosterior
from ..curvature import ggn, jacobian
from ..map import residual_sum_of_squares
from . import prior as prior_lib
from .linearised_laplace import LinearisedLaplaceGuide, broadest_within

#: The rules of ``AutoDiagonalLaplace(noise=...)`` for a learned noise scale.
NOISE_RULES = ("evidence", "map")

#: Candidate prior precisions of ``prior_precision="validation"``: 0.01 to 10^4, 5 a decade. A
#: diagonal posterior over every weight drops the correlations that cancel in function space, so
#: it needs larger precisions than a full-covariance one to predict as well.
VALIDATION_GRID = torch.logspace(-2, 4, 31, dtype=torch.float64)


def covariance_factor(C: torch.Tensor) -> torch.Tensor:
    """A factor ``F`` with ``F F^T = C`` of per-example output covariances ``(N, O, O)``
    (eigen-decomposition, negative rounding clipped; a square root when ``O = 1``)."""
    if C.shape[-1] == 1:
        return C.clamp_min(0.0).sqrt()
    e, Q = torch.linalg.eigh(C)
    return Q * e.clamp_min(0.0).sqrt().unsqueeze(-2)


class AutoDiagonalLaplace(LinearisedLaplaceGuide):
    """Linearised Laplace over every weight with a diagonal generalised Gauss-Newton (GGN)
    precision: laplace-torch's ``DiagLaplace`` as a Pyro guide.

    .. math::

        q(\\theta) = \\mathcal{N}\\big(\\hat\\theta,\\ \\mathrm{diag}(g + p)^{-1}\\big), \\qquad
        g = \\mathrm{diag}\\Big(\\sum_n J_n^\\top \\Lambda_n J_n\\Big),

    with :math:`J_n` the Jacobian of the network output in all ``D`` weights at the MAP
    :math:`\\hat\\theta`, :math:`\\Lambda_n` the output Hessian of the negative log-likelihood
    (:func:`~pyro_subnet.infer.curvature.ggn` with ``structure="diag"``, accumulated in mini-batches: memory
    ``O(D + B O D)``, never ``O(D^2)``) and ``p`` the prior precision. The linearised (GLM)
    predictive is

    .. math::

        f(x) \\sim \\mathcal{N}\\big(f(x; \\hat\\theta),\\ J(x)\\, \\mathrm{diag}(\\sigma^2)\\, J(x)^\\top\\big),
        \\qquad \\sigma_d^2 = 1 / (g_d + p_d),

    (plus the noise variance for regression), and the Laplace evidence (MacKay, 1992)

    .. math::

        \\log Z(p) \\approx \\log p(y \\mid \\hat\\theta) - \\tfrac12 \\sum_d p_d \\hat\\theta_d^2
          + \\tfrac12 \\sum_d \\log p_d - \\tfrac12 \\sum_d \\log(g_d + p_d).

    The diagonal is the cheapest Laplace posterior over a whole network (``O(D)`` memory); it
    ignores the correlations between weights, which is why its evidence-tuned prior is often too
    wide and a prior tuned on held-out data (``prior_precision="validation"``) predicts better.
    Daxberger, Kristiadi, Immer, Eschenhagen, Bauer, Hennig, *Laplace Redux: Effortless Bayesian
    Deep Learning*, NeurIPS 2021; MacKay, *A Practical Bayesian Framework for Backpropagation
    Networks*, Neural Computation, 1992.

    :meth:`fit` finds the MAP (unless ``map_steps=0`` or ``map_theta`` is given), accumulates
    ``g``, then sets or tunes ``p`` (and a learned noise). The guide then draws every weight site
    (``pyro.infer.Predictive`` works with ``parallel`` False or True, and by default draws the
    observation from the linearised network: the GLM predictive), :meth:`predict` gives the GLM or
    the sampled-network predictive, and :meth:`flat_posterior` hands the Gaussian to
    :class:`~pyro_subnet.infer.AnalyticPredictive`.

    :param model: a Pyro model: a user's PyroModule with PyroSample weights and an observed site in
        a data plate, or a :class:`~pyro_subnet.nn.BayesianNet` (see :class:`~pyro_subnet.nn.ModelBridge`).
    :param prior_precision: ``None`` (the model's own prior, as a Gaussian:
        :meth:`~pyro_subnet.nn.ModelBridge.prior_precision`), a positive number, a dict of site
        patterns to numbers (per layer), a tensor ``(D,)`` (per weight), ``"marglik"`` (maximise the
        evidence above, L-BFGS), ``"em"`` (MacKay's fixed point :math:`p_g = \\gamma_g /
        \\|\\hat\\theta_g\\|^2`, :math:`\\gamma_g = \\sum_{d \\in g} g_d / (g_d + p_d)`:
        :func:`.prior.tune_em_diagonal`), or ``"validation"``: one number from ``validation_grid`` by the GLM
        predictive's NLL on the held-out data given to ``fit(..., validation=(x_val, y_val))``, the
        broadest posterior within ``validation_tolerance`` of the best (:func:`.linearised_laplace.broadest_within`).
        A learned noise scale (a noise site such as ``sigma``, or ``BayesianNet(noise_scale=None)``)
        is tuned by the evidence from its MAP value (jointly with the prior when that is tuned by
        ``"marglik"`` or ``"em"``; the noise site's own prior is not used) and held at that value,
        unless ``noise="map"``.
    :param noise: how a learned noise scale is set: ``"evidence"`` (default, above) or ``"map"``,
        kept at its value at the MAP (the fitted one, or with ``map_theta`` the likelihood's for a
        noise hyperparameter and the root mean squared residual for a noise site). The diagonal's
        evidence overstates the posterior's volume (it drops the correlations), a cost that grows
        with the number of weights against the data and pushes the noise up: on a UCI network
        with more weights than data it calls the standardised targets almost all noise.
    :param prior_structure: what ``"marglik"`` / ``"em"`` tune: ``"scalar"`` (one precision),
        ``"layerwise"`` (one per weight site) or ``"diag"`` (one per weight).
    :param validation_grid: candidate precisions of ``"validation"`` (default :data:`VALIDATION_GRID`).
    :param predictive: what ``pyro.infer.Predictive(model, guide=guide)`` draws: ``"glm"`` (default)
        the observation from the network linearised at the MAP; ``"nn"`` (an explicit opt-in) the
        model's own network at the sampled weights, a different (often much wider) predictive.

    ``map_steps``, ``map_lr``, ``batch_size``, ``progress`` and ``validation_tolerance`` are those of
    :class:`.LinearisedLaplaceGuide`.

    >>> import torch
    >>> import pyro_subnet as ps
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> model = ps.nn.BayesianNet(net, likelihood="regression", noise_scale=0.1)
    >>> x = torch.linspace(-1, 1, 40)[:, None]; y = torch.sin(3 * x[:, 0])
    >>> guide = ps.infer.AutoDiagonalLaplace(model, prior_precision="marglik", map_steps=300,
    ...                                      progress=False).fit(x, y)
    >>> mean, var = guide.predict(x)
    >>> guide.flat_posterior().var.shape
    torch.Size([49])
    """

    def __init__(self, model, prior_precision=None, prior_structure: str = "scalar", validation_grid=None,
                 map_steps: int = 2000, map_lr: float = 1e-2, batch_size: int = 256, progress: bool = True,
                 predictive: str = "glm", validation_tolerance: float = 0.0, noise: str = "evidence"):
        super().__init__(model, map_steps=map_steps, map_lr=map_lr, batch_size=batch_size, progress=progress,
                         predictive=predictive, validation_tolerance=validation_tolerance)
        _check_prior_spec(prior_precision)
        if noise not in NOISE_RULES:
            raise ValueError(f"noise={noise!r}: choose one of {NOISE_RULES}.")
        self.noise = noise
        if prior_structure not in prior_lib.STRUCTURES:
            raise ValueError(f"prior_structure must be one of {prior_lib.STRUCTURES}, got {prior_structure!r}.")
        grid = VALIDATION_GRID if validation_grid is None else torch.as_tensor(validation_grid, dtype=torch.float64)
        grid = grid.reshape(-1)
        if grid.numel() == 0 or not (torch.isfinite(grid).all() and (grid > 0).all()):
            raise ValueError(f"validation_grid must hold positive finite numbers, got {validation_grid!r}.")
        self.prior_precision_spec = prior_precision
        self.prior_structure = prior_structure
        self.validation_grid = grid
        self.register_buffer("ggn", torch.empty(0))
        self.register_buffer("prior_prec", torch.empty(0))
        self.register_buffer("log_lik", torch.empty(0))

    # ------------------------------------------------------------------------------------------
    # Data sums below run over this rank's share (all of it in one process) and are all-reduced.
    def _ggn_diagonal(self, theta, x, y) -> torch.Tensor:
        x, y, _ = distributed.local_share(x, y)
        g = ggn(self.bridge.network, self.bridge.likelihood, theta, (x, y), structure="diag",
                batch_size=self.batch_size, progress=self._fit_progress) if x.shape[0] else None
        return distributed.all_reduce_sum(torch.zeros_like(theta) if g is None else g)

    def _initial_prior(self, spec, theta) -> torch.Tensor:
        """``(D,)``: the given precision, or the model's own prior (where tuning starts)."""
        D = self.num_weights
        everything = torch.arange(D, device=theta.device)
        if isinstance(spec, torch.Tensor):
            return prior_lib.expand_prior_precision(spec, self.bridge.layout, everything, torch.ones_like(theta))
        full = self._prior_full(theta.dtype, theta.device)
        return full if isinstance(spec, str) else prior_lib.expand_prior_precision(spec, self.bridge.layout,
                                                                                    everything, full)

    def _fit_posterior(self, theta, data, x, y) -> None:
        layout, lik = self.bridge.layout, self.bridge.likelihood
        everything = torch.arange(self.num_weights, device=theta.device)
        spec = self.prior_precision_spec
        g = self._ggn_diagonal(theta, x, y)
        if spec == "validation":   # one number, by the held-out NLL (then a learned noise by the evidence)
            spec = self._grid_search(theta, g, *self._validation_data())
        p = self._initial_prior(spec, theta)
        tune_prior = isinstance(spec, str)
        groups = prior_lib.structure_groups(self.prior_structure, layout, everything)
        if getattr(lik, "learn_noise", False) and self.noise == "evidence":
            # For a Gaussian likelihood g = g_1 / sigma^2, so g_1 is computed once and the evidence
            # is a closed-form function of (p, sigma).
            g1 = g * lik.noise_scale ** 2
            sse = residual_sum_of_squares(self.bridge.network, theta, (x, y), self.batch_size)
            num_obs = y.reshape(len(y), -1).numel()
            if spec == "em":
                p, scale = prior_lib.tune_em_diagonal(g1, theta, groups, p, sse, num_obs, lik.noise_scale, tune_prior)
            else:
                p, scale = prior_lib.tune_marglik_noise(g1, theta, groups, p, sse, num_obs, lik.noise_scale,
                                                        tune_prior=tune_prior)
            lik.set_noise_scale(scale)
            g = g1 / scale ** 2
        elif spec == "marglik":      # (a learned noise with noise="map" stays where the MAP put it)
            p = prior_lib.tune_marglik(g, theta, groups, p)
        elif spec == "em":
            p, _ = prior_lib.tune_em_diagonal(g, theta, groups, p)
        self.loc = theta.detach().clone()
        self.subnet_indices = everything
        self.ggn = g.detach()
        self.prior_prec = p.detach().to(theta.dtype)
        self.log_lik = self._log_lik(theta, x, y)

    # ------------------------------------------------------------------------------------------
    # the posterior
    @property
    def posterior_precision(self) -> torch.Tensor:
        """:math:`g + p`, shape ``(D,)``: the diagonal of the posterior precision."""
        self._check_fitted()
        return self.ggn + self.prior_prec

    @property
    def posterior_variance(self) -> torch.Tensor:
        """:math:`1 / (g + p)`, shape ``(D,)``: the marginal posterior variances."""
        return self.posterior_precision.reciprocal()

    def get_posterior(self, *args, **kwargs) -> dist.Independent:
        """The Gaussian over all ``D`` flat weights (``model.layout`` order), independent coordinates."""
        self._check_fitted()
        return dist.Normal(self.loc, self.posterior_variance.sqrt()).to_event(1)

    def flat_posterior(self) -> FlatPosterior:
        """``FlatPosterior(mean (D,), var (D,))``: the MAP and the diagonal posterior variances, the
        form in which :class:`~pyro_subnet.infer.AnalyticPredictive` reads a diagonal Gaussian."""
        self._check_fitted()
        return FlatPosterior(self.loc.detach().clone(), self.posterior_variance.detach().clone())

    # ------------------------------------------------------------------------------------------
    # hooks of LinearisedLaplaceGuide
    def _sample_subnet(self):
        return pyro.sample(f"_{self._pyro_name}_latent", self.get_posterior(), infer={"is_auxiliary": True})

    def _sample_deltas(self, num_samples, generator=None):
        device = generator.device if generator is not None else self.loc.device
        eps = torch.randn(num_samples, self.num_weights, dtype=self.loc.dtype, device=device, generator=generator)
        return eps.to(self.loc.device) * self.posterior_variance.sqrt()

    def _marginal_std(self):
        return self.posterior_variance.sqrt()

    def _output_covariance(self, theta, x, variances) -> Tuple[torch.Tensor, list]:
        """``f(x; theta)`` ``(N, O)`` and, for each ``(D,)`` row of ``variances``, the output covariance
        :math:`J_n \\mathrm{diag}(v) J_n^\\top` of every example ``(N, O, O)`` (one Jacobian each)."""
        f, J = jacobian(self.bridge.network, theta, x)
        return f, [torch.einsum("nod,nqd->noq", J * v.to(J.dtype), J) for v in variances]

    def _function_factor(self, x):
        """``f`` and a per-example factor ``F`` ``(N, O, O)`` of :math:`J_n \\mathrm{diag}(\\sigma^2) J_n^\\top`:
        exact example by example (which is all the GLM predictive reads), ``O`` columns instead of ``D``."""
        f, (C,) = self._output_covariance(self.loc, x, [self.posterior_variance])
        return f, covariance_factor(C)

    # ------------------------------------------------------------------------------------------
    # prior tuning and evidence
    def _grid_search(self, theta, g, x_val, y_val, grid=None) -> float:
        """The precision (one number, from ``grid``) chosen by the GLM predictive's NLL on
        ``(x_val, y_val)`` (the default link; a learned noise at its current value) by
        :func:`.linearised_laplace.broadest_within`: one Jacobian per validation batch, then ``O(N O^2 D)`` per value."""
        grid = self.validation_grid if grid is None else torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
        precisions = grid.tolist()
        variances = [(g.double() + p).reciprocal() for p in precisions]
        fs, Cs = [], []
        for xb, _ in iter_batches(x_val, self.batch_size, device=theta.device):
            f, covs = self._output_covariance(theta, xb, variances)
            fs.append(f.double())
            Cs.append([C.double() for C in covs])
        f = torch.cat(fs)
        scores = [self._glm_nll(f, covariance_factor(torch.cat([c[i] for c in Cs])), y_val)
                  for i in range(len(precisions))]
        return precisions[broadest_within(precisions, scores, self.validation_tolerance)]

    def tune_prior_precision(self, x_val: torch.Tensor, y_val: torch.Tensor, grid=None) -> float:
        """Choose one prior precision by the GLM predictive's NLL on held-out data (what
        ``prior_precision="validation"`` does in :meth:`fit`), on a fitted guide.

        :param x_val: validation inputs (not the test set).
        :param y_val: validation targets.
        :param grid: candidate precisions (default ``validation_grid``).
        :returns: the chosen precision (also stored; the evidence and predictives use it).
        """
        self._check_fitted()
        x_val, y_val = (t.to(self.loc.device) for t in self.bridge.check(x_val, y_val))
        best = self._grid_search(self.loc, self.ggn, x_val, y_val, grid)
        self.prior_prec = torch.full_like(self.prior_prec, best)
        return best

    def log_marginal_likelihood(self, prior_precision=None) -> torch.Tensor:
        """The diagonal linearised Laplace evidence :math:`\\log Z` (class docstring) at the fitted
        prior precision or at ``prior_precision`` (a number, a dict of site patterns or a ``(D,)``
        tensor; differentiable in a tensor)."""
        self._check_fitted()
        p = self.prior_prec if prior_precision is None else prior_lib.expand_prior_precision(
            prior_precision, self.bridge.layout, self.subnet_indices, self.prior_prec)
        return prior_lib.log_evidence(self.log_lik, self.loc, p, self.ggn)


def _check_prior_spec(spec) -> None:
    """Refuse a prior precision that can never work, at construction (its shape is checked in fit)."""
    if spec is None or isinstance(spec, (Mapping, torch.Tensor)):
        return
    if isinstance(spec, str):
        if spec not in prior_lib.TUNERS:
            raise ValueError(f"prior_precision: a string must be one of {prior_lib.TUNERS}, got {spec!r}.")
        return
    if isinstance(spec, Number) and not isinstance(spec, bool):
        if not (math.isfinite(spec) and spec > 0):
            raise ValueError(f"prior_precision must be positive and finite, got {spec!r}.")
        return
    raise ValueError("prior_precision must be None, a positive number, a dict of site patterns to numbers, a "
                     f"tensor of shape () or (D,), 'marglik', 'em' or 'validation'; got {spec!r}.")
