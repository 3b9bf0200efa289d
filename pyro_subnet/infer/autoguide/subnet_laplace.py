"""AutoSubnetLaplace: subnetwork linearised Laplace (Daxberger et al., ICML 2021) as a Pyro guide."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ...data.batches import iter_batches
from .. import distributed
from ..curvature import FlatGaussian, ggn, jacobian, log_likelihood_gradient
from ..map import residual_sum_of_squares
from . import prior as prior_lib
from .cholesky import NotPositiveDefiniteError, cholesky, precision_to_scale_tril
from .linearised_laplace import LinearisedLaplaceGuide, broadest_within
from .subnet_selection import warn_if_flat


#: Candidate prior precisions of ``prior_precision="validation"``: 0.1 to 10^4, 5 a decade.
VALIDATION_GRID = torch.logspace(-1, 4, 26, dtype=torch.float64)


class AutoSubnetLaplace(LinearisedLaplaceGuide):
    """Full-covariance linearised Laplace over a subnetwork, every other weight at its MAP.

    .. math::

        q(\\theta) = \\mathcal{N}(\\theta_S; \\hat\\theta_S, (G_S + P_0)^{-1})
                     \\prod_{r \\notin S} \\delta(\\theta_r - \\hat\\theta_r), \\qquad
        G_S = \\sum_n J_{S,n}^\\top \\Lambda_n J_{S,n},

    with :math:`J_{S,n}` the Jacobian of the network output in the ``k`` subnetwork weights at
    the MAP and :math:`\\Lambda_n` the output Hessian of the negative log-likelihood (the GGN of
    :mod:`~pyro_subnet.infer.curvature`, accumulated in mini-batches; memory ``O(k^2 + B O D_touched)``, never
    ``O(D^2)``). Daxberger et al., *Bayesian Deep Learning via Subnetwork Inference*, ICML 2021.

    :meth:`fit` finds the MAP (unless ``map_steps=0``), selects ``S``, accumulates
    :math:`G_S`, sets or tunes :math:`P_0` and factorises the precision. The guide then draws
    every weight site (``pyro.infer.Predictive`` works with ``parallel`` False or True), and
    :meth:`predict` gives the linearised (GLM) or sampled-network predictive.

    :param model: a Pyro model: a user's PyroModule with PyroSample weights and an observed site
        in a data plate, or a :class:`~pyro_subnet.nn.BayesianNet` (see
        :class:`~pyro_subnet.nn.ModelBridge`).
    :param subnet: a selection strategy from :mod:`pyro_subnet.subnet` (default
        ``PredictiveVariance(min(1000, D))``) or a LongTensor of flat weight indices.
    :param prior_precision: ``None`` (the model's own prior, as a Gaussian:
        :meth:`~pyro_subnet.nn.ModelBridge.prior_precision`), a number, a dict of site patterns to
        numbers (per layer), a tensor ``(k,)`` (per weight), ``"marglik"`` / ``"em"`` to tune
        it by the Laplace evidence / the EM (MacKay) update (see :mod:`.prior`), or
        ``"validation"``: one number from :data:`VALIDATION_GRID` by the GLM predictive's NLL on
        the held-out data given to ``fit(..., validation=(x_val, y_val))`` (the grid search of
        Daxberger et al.; the evidence of a network trained to fit its data often prefers a prior
        so wide that the predictive is less confident than the MAP's): the broadest posterior
        within ``validation_tolerance`` of the best NLL (:func:`.linearised_laplace.broadest_within`). A learned noise
        scale (a noise site such as ``sigma``, or ``BayesianNet(noise_scale=None)``) is tuned by the
        same rule from its MAP (jointly with the precision; :func:`.prior.tune_marglik_noise`;
        the evidence alone, the noise site's prior is not used) and held at that value.
    :param prior_structure: what is tuned: ``"scalar"``, ``"layerwise"`` or ``"diag"``.
    :param newton_step: after the MAP, take one Gauss-Newton step on the subnetwork, to the mode
        of the linearised model (exact for linear-Gaussian models; Antorán et al., ICML 2022).
    :param predictive: what ``pyro.infer.Predictive(model, guide=guide)`` draws: ``"glm"`` (default)
        the observation from the network linearised at the MAP, the predictive of the Laplace
        posterior; ``"nn"`` (an explicit opt-in) the model's own network at the sampled weights,
        which for a nonlinear network is a different predictive (often much wider).

    ``map_steps``, ``map_lr``, ``batch_size``, ``progress`` and ``validation_tolerance`` are those of
    :class:`.LinearisedLaplaceGuide`.

    >>> import pyro_subnet as ps
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> model = ps.nn.BayesianNet(net, likelihood="regression", noise_scale=0.1)
    >>> x = torch.linspace(-1, 1, 40)[:, None]; y = torch.sin(3 * x[:, 0])
    >>> guide = ps.infer.AutoSubnetLaplace(model, subnet=ps.subnet.LargestMagnitude(10),
    ...                                    map_steps=500, progress=False).fit(x, y)
    >>> mean, var = guide.predict(x)
    >>> guide.flat_gaussian().scale_tril.shape
    torch.Size([10, 10])
    """

    def __init__(self, model, subnet=None, prior_precision=None,
                 prior_structure: str = "scalar", newton_step: bool = False, map_steps: int = 2000,
                 map_lr: float = 1e-2, batch_size: int = 256, progress: bool = True, predictive: str = "glm",
                 validation_tolerance: float = 0.0):
        super().__init__(model, map_steps=map_steps, map_lr=map_lr, batch_size=batch_size, progress=progress,
                         predictive=predictive, validation_tolerance=validation_tolerance)
        if prior_structure not in prior_lib.STRUCTURES:
            raise ValueError(f"prior_structure must be one of {prior_lib.STRUCTURES}, got {prior_structure!r}.")
        if isinstance(prior_precision, str) and prior_precision not in prior_lib.TUNERS:
            raise ValueError(f"prior_precision: a string must be one of {prior_lib.TUNERS}, got {prior_precision!r}.")
        self.subnet = subnet
        self.prior_precision_spec = prior_precision
        self.prior_structure = prior_structure
        self.newton_step = newton_step
        self.register_buffer("ggn", torch.empty(0))
        self.register_buffer("prior_prec", torch.empty(0))
        self.register_buffer("scale_tril", torch.empty(0))
        self.register_buffer("log_lik", torch.empty(0))

    # ------------------------------------------------------------------------------------------
    # Data sums below run over this rank's share (all of it in one process) and are all-reduced.
    def _ggn(self, theta, idx, x, y, dtype=None) -> torch.Tensor:
        x, y, _ = distributed.local_share(x, y)
        G = ggn(self.bridge.network, self.bridge.likelihood, theta, (x, y), indices=idx, structure="dense",
                batch_size=self.batch_size, progress=self._fit_progress, dtype=dtype) if x.shape[0] else None
        if G is None:
            G = theta.new_zeros(len(idx), len(idx), dtype=dtype)
        return distributed.all_reduce_sum(G)

    def _gauss_newton_step(self, theta, idx, precision, x, y) -> torch.Tensor:
        """One Gauss-Newton step on the subnetwork: :math:`\\theta_S - (G_S + P_0)^{-1} g` with
        :math:`g = -\\sum_n J_{S,n}^\\top \\nabla_f \\log p(y_n \\mid f_n) + P_0 \\theta_S`, the gradient
        of the negative log joint."""
        x, y, _ = distributed.local_share(x, y)
        data_grad = distributed.all_reduce_sum(log_likelihood_gradient(
            self.bridge.network, self.bridge.likelihood, theta, (x, y), idx, self.batch_size))
        grad = -data_grad + torch.diagonal(precision - self.ggn) * theta[idx]
        step = torch.cholesky_solve(grad[:, None].to(precision.dtype), cholesky(precision))[:, 0]
        return theta.index_copy(0, idx, theta[idx] - step.to(theta.dtype))

    def _fit_posterior(self, theta, data, x, y) -> None:
        prior_full = self._prior_full(theta.dtype, theta.device)
        idx = self._select(theta, data, prior_full)
        lik = self.bridge.likelihood
        noise = getattr(lik, "noise_scale", None)
        try:
            self._posterior_from_ggn(theta, idx, self._ggn(theta, idx, x, y), prior_full, x, y)
        except NotPositiveDefiniteError:
            if theta.dtype == torch.float64:
                raise
            # A float32 GGN is positive semi-definite only up to rounding (of order 1e-7 of its
            # largest eigenvalue): with a small noise and a weak prior that rounding leaves the
            # precision indefinite. Summed in float64 (and kept so) it is the exact GGN of the
            # float32 Jacobians; the tuning starts again from the same noise.
            if noise is not None and getattr(lik, "learn_noise", False):
                lik.set_noise_scale(noise)
            self._posterior_from_ggn(theta, idx, self._ggn(theta, idx, x, y, dtype=torch.float64), prior_full, x, y)

    def _posterior_from_ggn(self, theta, idx, G, prior_full, x, y) -> None:
        """Prior precision (and a learned noise) from the GGN ``G`` over ``idx``, then the posterior
        factor; ``G`` may be float64 for float32 weights (the factor is cast to theirs)."""
        layout = self.bridge.layout
        spec = self.prior_precision_spec
        if spec == "validation":   # one number, by the held-out NLL (then a learned noise by the evidence)
            spec = self._grid_search(theta, idx, G, *self._validation_data())
        self.subnet_indices = idx
        self.ggn = G
        lik = self.bridge.likelihood
        if getattr(lik, "learn_noise", False):
            # The noise is learned by the evidence, with the prior precision when that is tuned
            # too (G = G_1 / sigma^2 for a Gaussian likelihood, so G_1 is computed once).
            groups = prior_lib.structure_groups(self.prior_structure, layout, idx)
            tune_prior = isinstance(spec, str)
            init = prior_full[idx] if tune_prior else prior_lib.expand_prior_precision(spec, layout, idx, prior_full[idx])
            tune = prior_lib.tune_em_noise if spec == "em" else prior_lib.tune_marglik_noise
            G1 = G * lik.noise_scale ** 2
            y2 = y.reshape(len(y), -1)
            sse = residual_sum_of_squares(self.bridge.network, theta, (x, y), self.batch_size)
            p, scale = tune(G1, theta[idx], groups, init, sse, y2.numel(), lik.noise_scale, tune_prior=tune_prior)
            lik.set_noise_scale(scale)
            G = G1 / scale ** 2
            self.ggn = G
        elif isinstance(spec, str):
            groups = prior_lib.structure_groups(self.prior_structure, layout, idx)
            tune = prior_lib.tune_marglik if spec == "marglik" else prior_lib.tune_em
            p = tune(G, theta[idx], groups, prior_full[idx])
        else:
            p = prior_lib.expand_prior_precision(spec, layout, idx, prior_full[idx])
        warn_if_flat(torch.diagonal(G), p)
        precision = G + torch.diag(p)
        if self.newton_step:
            theta = self._gauss_newton_step(theta, idx, precision, x, y)
        self.loc = theta.detach().clone()
        self.prior_prec = p
        self.log_lik = self._log_lik(theta, x, y)
        self.scale_tril = precision_to_scale_tril(precision).to(theta.dtype)

    # ------------------------------------------------------------------------------------------
    def _sample_subnet(self):
        return pyro.sample(f"_{self._pyro_name}_latent", self.get_posterior(), infer={"is_auxiliary": True})

    def _sample_deltas(self, num_samples, generator=None):
        eps = torch.randn(num_samples, self.scale_tril.shape[0], dtype=self.loc.dtype, device=self.loc.device,
                          generator=generator)
        return eps @ self.scale_tril.T

    def _function_factor(self, x):
        f, J = jacobian(self.bridge.network, self.loc, x, self.subnet_indices)
        return f, J @ self.scale_tril

    def _marginal_std(self):
        return self.scale_tril.pow(2).sum(-1).sqrt()

    # ------------------------------------------------------------------------------------------
    def get_posterior(self, *args, **kwargs) -> dist.MultivariateNormal:
        """The Gaussian over the subnetwork weights (in the order of :attr:`subnet_indices`)."""
        self._check_fitted()
        return dist.MultivariateNormal(self.loc[self.subnet_indices], scale_tril=self.scale_tril)

    def flat_gaussian(self) -> FlatGaussian:
        """``FlatGaussian(mean (D,), indices (k,), scale_tril (k, k))``."""
        self._check_fitted()
        return FlatGaussian(self.loc, self.subnet_indices, self.scale_tril)

    @property
    def posterior_precision(self) -> torch.Tensor:
        """:math:`G_S + P_0`, shape ``(k, k)``."""
        self._check_fitted()
        return self.ggn + torch.diag(self.prior_prec)

    @property
    def posterior_covariance(self) -> torch.Tensor:
        self._check_fitted()
        return self.scale_tril @ self.scale_tril.T

    def _grid_search(self, theta, idx, G, x_val, y_val, grid=None) -> float:
        """The precision (one number, from ``grid``) chosen by the GLM predictive's NLL on
        ``(x_val, y_val)`` (the default link; a learned noise at its current value) by
        :func:`.linearised_laplace.broadest_within`. With
        :math:`G_S = Q \\mathrm{diag}(e) Q^\\top` computed once, each grid value's factor is
        :math:`F = J Q \\mathrm{diag}(e + p)^{-1/2}`: ``O(N O k)`` per value."""
        grid = VALIDATION_GRID if grid is None else torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
        e, Q = torch.linalg.eigh(G.double())
        e = e.clamp_min(0.0)
        fs, JQs = [], []
        for xb, _ in iter_batches(x_val, self.batch_size):
            f, J = jacobian(self.bridge.network, theta, xb, idx)
            fs.append(f.double())
            JQs.append(J.double() @ Q)
        f, JQ = torch.cat(fs), torch.cat(JQs)
        precisions = grid.tolist()
        scores = [self._glm_nll(f, JQ * torch.rsqrt(e + p), y_val) for p in precisions]
        return precisions[broadest_within(precisions, scores, self.validation_tolerance)]

    def tune_prior_precision(self, x_val: torch.Tensor, y_val: torch.Tensor, grid=None) -> float:
        """Choose one prior precision by the GLM predictive's NLL on held-out data (the
        grid-search cross-validation of Daxberger et al.), and refactorise: what
        ``prior_precision="validation"`` does in :meth:`fit`, on a fitted guide.

        :param x_val: validation inputs (not the test set).
        :param y_val: validation targets.
        :param grid: candidate precisions (default :data:`VALIDATION_GRID`; large values approach
            the MAP network, so with the grid's MAP end the choice is within
            ``validation_tolerance`` of the MAP's NLL on ``x_val`` or better).
        :returns: the chosen precision (also stored; the evidence and predictives use it).
        """
        self._check_fitted()
        x_val, y_val = (t.to(self.loc.device) for t in self.bridge.check(x_val, y_val))
        best = self._grid_search(self.loc, self.subnet_indices, self.ggn, x_val, y_val, grid)
        self.prior_prec = torch.full_like(self.prior_prec, best)
        self.scale_tril = precision_to_scale_tril(self.posterior_precision).to(self.loc.dtype)
        return best

    def log_marginal_likelihood(self, prior_precision=None) -> torch.Tensor:
        """The linearised Laplace evidence :math:`\\log p(y)` (:mod:`.prior`), at the fitted
        prior precision or at ``prior_precision`` (number, dict or ``(k,)`` tensor)."""
        self._check_fitted()
        p = self.prior_prec if prior_precision is None else prior_lib.expand_prior_precision(
            prior_precision, self.bridge.layout, self.subnet_indices, self.prior_prec)
        return prior_lib.log_evidence(self.log_lik, self.loc[self.subnet_indices], p, self.ggn)
