"""AutoSampledLaplace: linearised Laplace over every weight, by sample-then-optimise."""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from tqdm.auto import trange

from ..analytic.posterior import FlatPosterior
from ..curvature import jvp
from ..map import residual_sum_of_squares
from ..randomness import resolve_seed
from . import prior as prior_lib
from . import sample_then_optimise as sto
from .linearised_laplace import LinearisedLaplaceGuide, broadest_within

#: Candidate prior precisions of ``prior_precision="validation"``: 0.1 to 10^4, 2 a decade (each
#: costs a warm-started solve for the samples).
VALIDATION_GRID = torch.logspace(-1, 4, 11, dtype=torch.float64)


class AutoSampledLaplace(LinearisedLaplaceGuide):
    """Linearised Laplace posterior samples without a covariance matrix (Antorán et al., ICLR
    2023; Antorán, PhD thesis, 2024).

    A dense covariance over ``k`` weights costs ``k^2`` memory and ``k^3`` time; this guide holds
    ``K = num_posterior_samples`` draws :math:`\\zeta_j \\sim N(0, (G + A)^{-1})` instead, each the
    solution of a randomised least-squares problem in the linearised network
    (:mod:`.sample_then_optimise`), all solved together with GGN-vector products. Memory is
    ``O(K k)``: linear in the number of weights, so ``subnet=ps.subnet.All()`` (the default) works
    for networks whose GGN could never be stored.

    Fitting: the MAP :math:`\\theta_*` (unless given or ``map_steps=0``); then, for each EM step,
    one batched solve for the ``K`` samples and the linearised model's mean
    :math:`\\bar\\theta = \\theta_* + (G + A)^{-1}(\\sum_n J_n^\\top \\nabla_f\\log p(y_n|f_n) - A\\theta_*)`,
    and, with ``prior_precision="em"``, MacKay's update :math:`a = \\gamma / \\|\\bar\\theta\\|^2` with
    :math:`\\gamma = \\frac1K\\sum_j \\zeta_j^\\top G \\zeta_j` (the effective number of parameters,
    estimated from the samples). EM steps warm-start from the previous solution and the random
    draws are kept (rescaled), so the iterates move smoothly; EM stops when the precision changes
    by less than ``em_tol`` (relative).

    The guide then behaves like :class:`~pyro_subnet.infer.AutoSubnetLaplace`: ``guide(*args)``
    draws one of the ``K`` samples or its mirror image about the MAP (antithetic pairs: the draws
    then have the GLM predictive's mean exactly), so ``pyro.infer.Predictive`` works, sequential
    or parallel;
    ``predict(x, method="glm")`` uses the function-space factor :math:`F = [J\\zeta_1, \\dots,
    J\\zeta_K] / \\sqrt K`, ``median``/``quantiles`` and ``state_dict`` work.

    :param model: a Pyro model (a user's PyroModule or a :class:`~pyro_subnet.nn.BayesianNet`; see
        :class:`~pyro_subnet.nn.ModelBridge`).
    :param subnet: a ``ps.subnet`` strategy or indices (default: all weights).
    :param num_posterior_samples: ``K``.
    :param prior_precision: ``None`` (the model's prior), a number, a dict of site patterns to
        numbers, a tensor ``(k,)``, ``"em"`` (tuned by EM, see ``prior_structure``), or
        ``"validation"``: one number from :data:`VALIDATION_GRID` by the GLM predictive's NLL on the
        held-out data given to ``fit(..., validation=(x_val, y_val))``: the broadest posterior
        within ``validation_tolerance`` of the best (:func:`.linearised_laplace.broadest_within`). A regression
        model with ``noise_scale=None`` also gets its noise scale by EM,
        :math:`\\sigma^2 = \\mathrm{SSE}/(M - \\gamma)` (MacKay, 1992), stored in its likelihood.
    :param prior_structure: what EM tunes: ``"scalar"`` (one precision) or ``"layerwise"`` (one per
        weight site, each with its own :math:`\\gamma_g = \\frac1K\\sum_j \\zeta_{j,g}^\\top (G\\zeta_j)_g`).
    :param num_em_steps: at most this many EM steps (with ``"em"``).
    :param em_tol: relative change of the prior precision at which EM stops.
    :param solver: ``"cg"`` (batched conjugate gradients with full-batch GGN products, Jacobi
        preconditioned; the default) or ``"sgd"`` (the paper's mini-batch Nesterov SGD with Polyak
        averaging).
    :param tol: relative residual at which a solve stops.
    :param max_iter: CG iterations (or SGD epochs) per solve.
    :param sgd_lr: learning rate of the SGD solver.
    :param newton_step: centre the guide on the linearised model's mean :math:`\\bar\\theta` instead
        of the MAP (exact for linear-Gaussian models). Either way the network stays linearised at
        the MAP, and EM uses :math:`\\bar\\theta`, as the paper's update asks.
    :param seed: seed of the random draws (the same on every rank under ``torch.distributed``);
        ``None`` (default): drawn from torch's global generator at :meth:`fit`, so
        ``pyro.set_rng_seed`` governs it.
    :param predictive: what ``pyro.infer.Predictive(model, guide=guide)`` draws (``"glm"``, default,
        or ``"nn"``; see :class:`~pyro_subnet.infer.AutoSubnetLaplace`).

    ``map_steps``, ``map_lr``, ``batch_size``, ``progress`` and ``validation_tolerance`` are those of
    :class:`.LinearisedLaplaceGuide`.

    >>> import pyro_subnet as ps
    >>> from torch import nn
    >>> model = ps.nn.BayesianNet(nn.Sequential(nn.Linear(1, 20), nn.Tanh(), nn.Linear(20, 1)),
    ...                           likelihood="regression", noise_scale=0.1)
    >>> ds = ps.data.gap_regression(n=40)
    >>> guide = ps.infer.AutoSampledLaplace(model, num_posterior_samples=16, map_steps=300, progress=False)
    >>> mean, var = guide.fit(ds.x_train, ds.y_train).predict(ds.x_test)
    >>> guide.samples.shape
    torch.Size([16, 61])
    """

    _default_subnet = "all"

    def __init__(self, model, subnet=None, num_posterior_samples: int = 64, prior_precision=None,
                 num_em_steps: int = 10, em_tol: float = 1e-3, solver: str = "cg", tol: float = 1e-4,
                 max_iter: int = 500, sgd_lr: float = 1e-3, newton_step: bool = False,
                 prior_structure: str = "scalar", seed: Optional[int] = None, map_steps: int = 2000,
                 map_lr: float = 1e-2, batch_size: int = 256, progress: bool = True, predictive: str = "glm",
                 validation_tolerance: float = 0.0):
        super().__init__(model, map_steps=map_steps, map_lr=map_lr, batch_size=batch_size, progress=progress,
                         predictive=predictive, validation_tolerance=validation_tolerance)
        if not (isinstance(num_posterior_samples, int) and num_posterior_samples >= 2):
            raise ValueError(f"num_posterior_samples must be an integer >= 2, got {num_posterior_samples!r}.")
        if solver not in ("cg", "sgd"):
            raise ValueError(f"solver must be 'cg' or 'sgd', got {solver!r}.")
        if isinstance(prior_precision, str) and prior_precision not in ("em", "validation"):
            raise ValueError(f"prior_precision: a string must be 'em' or 'validation', got {prior_precision!r}.")
        self.subnet = subnet
        if prior_structure not in ("scalar", "layerwise"):
            raise ValueError(f"prior_structure must be 'scalar' or 'layerwise', got {prior_structure!r}.")
        self.prior_precision_spec = prior_precision
        self.prior_structure = prior_structure
        self.num_posterior_samples = num_posterior_samples
        self.num_em_steps, self.em_tol = num_em_steps, em_tol
        self.solver, self.tol, self.max_iter, self.sgd_lr, self.seed = solver, tol, max_iter, sgd_lr, seed
        self.newton_step = newton_step
        self.register_buffer("samples", torch.empty(0))
        self.register_buffer("prior_prec", torch.empty(0))
        self.register_buffer("em_trace", torch.empty(0))

    # ------------------------------------------------------------------------------------------
    def _solve(self, theta, data, a, b, x0, diag_g, idx):
        if self.solver == "cg":
            return sto.solve_cg(self.bridge.network, self.bridge.likelihood, theta, data, a, b, x0, diag_g, idx,
                                self.batch_size, self.tol, self.max_iter, self._fit_progress)
        return sto.solve_sgd(self.bridge.network, self.bridge.likelihood, theta, data, a, b, x0, idx,
                             self.batch_size, self.sgd_lr, num_epochs=self.max_iter, tol=self.tol,
                             generator=torch.Generator().manual_seed(self._fit_seed + 1), progress=self._fit_progress)

    def _fit_posterior(self, theta, data, x, y) -> None:
        net, lik = self.bridge.network, self.bridge.likelihood
        self._fit_seed = resolve_seed(self.seed)
        prior_full = self._prior_full(theta.dtype, theta.device)
        idx = self._select(theta, (x, y), prior_full)
        spec = None if isinstance(self.prior_precision_spec, str) else self.prior_precision_spec
        a = prior_lib.expand_prior_precision(spec, self.bridge.layout, idx, prior_full[idx])
        tune_prior = self.prior_precision_spec == "em"
        groups = prior_lib.structure_groups(self.prior_structure, self.bridge.layout, idx)
        num_groups = int(groups.max()) + 1
        group_size = torch.bincount(groups, minlength=num_groups).to(a.dtype)
        if tune_prior:   # one precision per group (its mean over the group), as the MacKay update tunes
            a = (torch.zeros(num_groups, dtype=a.dtype, device=a.device).index_add_(0, groups, a) / group_size)[groups]
        learn_noise = getattr(lik, "learn_noise", False)

        def prepare():
            # Everything that depends on the noise scale; the same seed keeps the same draws.
            gen = torch.Generator().manual_seed(self._fit_seed)
            draws = sto.draw_targets(net, lik, theta, (x, y), self.num_posterior_samples, idx, self.batch_size, gen)
            return draws, draws.diag_ggn(), sto.output_gradient_term(net, lik, theta, (x, y), idx, self.batch_size)

        draws, diag_g, grad_term = prepare()
        if learn_noise:
            sse = residual_sum_of_squares(net, theta, (x, y), self.batch_size)
            num_obs = y.reshape(len(y), -1).numel()
        theta_s = theta[idx]
        solution = torch.zeros(self.num_posterior_samples + 1, len(idx), dtype=theta.dtype, device=theta.device)
        trace = []
        steps = self.num_em_steps if (tune_prior or learn_noise) else 1
        bar = trange(steps, desc="EM (prior precision)", disable=not (self._fit_progress and steps > 1), leave=False)
        def solve_at(a, start):
            # Row 0 is the Gauss-Newton step to the linearised model's mean; rows 1.. the samples.
            # (draws, diag_g and grad_term are read at call time: a noise update replaces them.)
            b = torch.cat([(grad_term - a * theta_s)[None], a * draws.targets(a)])
            return self._solve(theta, (x, y), a, b, start, diag_g, idx)

        if self.prior_precision_spec == "validation":
            a, solution = self._validation_search(solve_at, a, solution, theta, idx)
        for _ in bar:
            sol = solve_at(a, solution)
            solution = sol.samples
            mean = theta_s + solution[0]
            samples = sto.STOSolution(solution[1:], sol.g_samples[1:], sol.iterations, sol.residual)
            gamma_g = sto.effective_dimension(samples, groups, num_groups)
            gamma_g = torch.minimum(gamma_g.clamp_min(1e-6), group_size)
            gamma = gamma_g.sum()                                  # gamma lies in (0, k), per group too
            trace.append([float(a.mean()), float(gamma), sol.iterations, sol.residual])
            if not (tune_prior or learn_noise):
                break
            if tune_prior:
                theta_sq = torch.zeros(num_groups, dtype=mean.dtype, device=mean.device).index_add_(0, groups, mean.pow(2))
                new = prior_lib.mackay_update(theta_sq, gamma_g)[groups]
            else:
                new = a
            bar.set_postfix(prior_precision=f"{float(new.mean()):.4g}", gamma=f"{float(gamma):.1f}")
            converged = float(((new - a).abs() / a).max()) < self.em_tol
            a = new.clone()
            if learn_noise:
                # MacKay's noise update sigma^2 = SSE / (M - gamma); the draws, the diagonal GGN
                # and the gradient term scale with 1 / sigma^2, so they are recomputed.
                scale = (sse / max(num_obs - float(gamma), 1.0)) ** 0.5
                converged = converged and abs(scale / lik.noise_scale - 1) < self.em_tol
                lik.set_noise_scale(max(scale, 1e-6))
                draws, diag_g, grad_term = prepare()
            if converged:
                break
        if tune_prior or learn_noise:
            # The samples belong to the final precision: one more solve at it (warm-started).
            solution = solve_at(a, solution).samples
            mean = theta_s + solution[0]
        self.subnet_indices = idx
        # Without the Newton step the guide is centred at the MAP, like AutoSubnetLaplace: moving
        # the centre of a nonlinear network away from where it was linearised changes its Jacobian.
        self.loc = theta.detach().clone()
        if self.newton_step:
            self.loc = self.loc.index_copy(0, idx, mean.detach())
        self.samples = solution[1:].detach()
        self.prior_prec = a.detach()
        self.em_trace = torch.tensor(trace, dtype=torch.float64)

    # ------------------------------------------------------------------------------------------
    def _validation_search(self, solve_at, a, start, theta, idx):
        """``prior_precision="validation"``: one precision from :data:`VALIDATION_GRID`, walked down
        from its MAP end (each solve warm-started from the last), chosen by the GLM predictive's
        NLL on the held-out data (:func:`.linearised_laplace.broadest_within`); the walk stops once two values in
        a row are outside the rule's bound (below them the NLL only rises). Returns the precision
        ``(k,)`` and its solution."""
        x_val, y_val = self._validation_data()
        tried, scores, outside = [], [], 0
        for p in reversed(VALIDATION_GRID.tolist()):
            a = torch.full_like(a, p)
            start = solve_at(a, start).samples
            f, JZ = jvp(self.bridge.network, theta, x_val, start[1:], idx)            # (K, N, O)
            scores.append(self._glm_nll(f, JZ.permute(1, 2, 0) / (start.shape[0] - 1) ** 0.5, y_val))
            tried.append((p, a, start))
            best = min(scores)
            outside = outside + 1 if scores[-1] > best + self.validation_tolerance * abs(best) else 0
            if outside == 2:
                break
        chosen = broadest_within([t[0] for t in tried], scores, self.validation_tolerance)
        return tried[chosen][1], tried[chosen][2]

    def _antithetic(self) -> torch.Tensor:
        """The ``2K`` offsets ``(+zeta_1, ..., +zeta_K, -zeta_1, ..., -zeta_K)``: the draws are
        zero-mean Gaussian, so the pairs keep their covariance and make the empirical mean exactly
        the MAP, as the GLM predictive (mean ``f(x; MAP)``, covariance from ``F``) says."""
        return torch.cat([self.samples, -self.samples])

    def _sample_subnet(self):
        draws = self._antithetic()
        j = pyro.sample(f"_{self._pyro_name}_draw", dist.Categorical(logits=draws.new_zeros(draws.shape[0])),
                        infer={"is_auxiliary": True})
        return self.loc[self.subnet_indices] + draws[j]

    def _sample_deltas(self, num_samples, generator=None):
        draws = self._antithetic()
        j = torch.randint(draws.shape[0], (num_samples,), generator=generator, device="cpu")
        return draws[j.to(draws.device)]

    def _function_factor(self, x):
        f, JZ = jvp(self.bridge.network, self.loc, x, self.samples, self.subnet_indices)   # (K, N, O)
        return f, JZ.permute(1, 2, 0) / self.samples.shape[0] ** 0.5

    def _marginal_std(self):
        return self.samples.pow(2).mean(0).sqrt()

    def flat_posterior(self) -> FlatPosterior:
        """The Gaussian the samples stand for, over the flat weights: the centre everywhere and, on
        the subnetwork, the covariance :math:`Z^\\top Z / K` of the ``K`` samples ``Z`` (exactly that
        of the antithetic draws), as the factor :math:`Z^\\top / \\sqrt K` of width ``K``; e.g. for
        :class:`~pyro_subnet.infer.AnalyticPredictive`."""
        self._check_fitted()
        mean = self.loc.detach()
        factor = self.samples.T / self.samples.shape[0] ** 0.5
        return FlatPosterior(mean, torch.zeros_like(mean), self.subnet_indices, factor)

    def get_posterior(self, *args, **kwargs) -> dist.Empirical:
        """The posterior samples of the subnetwork weights and their mirror images about the MAP
        (``2K``, see :meth:`_antithetic`) as an empirical distribution."""
        self._check_fitted()
        values = self.loc[self.subnet_indices] + self._antithetic()
        return dist.Empirical(values, torch.zeros(values.shape[0], dtype=values.dtype, device=values.device))

    def effective_dimension(self) -> float:
        """The last EM step's estimate of :math:`\\gamma = \\mathrm{tr}((G+A)^{-1} G)`."""
        self._check_fitted()
        return float(self.em_trace[-1, 1])
