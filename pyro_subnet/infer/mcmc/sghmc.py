"""Stochastic-gradient Hamiltonian Monte Carlo as a ``pyro.infer.MCMC`` kernel."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Dict, Optional, Union

import torch
from pyro.infer.autoguide.initialization import init_to_sample
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel

from ...nn import SiteLayout
from ...nn.bridge import BatchAwareModel, ModelBridge, UnsupportedModelError, check_model
from ..map import residual_scale
from . import integrator
from . import step_size as step_size_lib
from . import warm_start
from .potential import NetPotential, TracePotential, setup_trace_model
from .preconditioners import PreconditionerState, make_preconditioner
from .step_size_schedules import make_schedule


#: With a fixed step size, the gradient noise (for the end-of-warm-up warning) is estimated on
#: every this-many steps of warm-up instead of every step.
FIXED_STEP_NOISE_EVERY = 5


class SGHMC(MCMCKernel):
    """Stochastic-gradient HMC (Chen, Fox & Guestrin, ICML 2014) with a diagonal preconditioner,
    for :class:`pyro.infer.MCMC`, driven like NUTS but on mini-batches:

    .. math::

        v \\leftarrow (1 - \\alpha) v - \\epsilon_t G \\nabla \\tilde U(\\theta)
            + \\sqrt{2 \\alpha \\epsilon_t G}\\, \\xi, \\qquad \\theta \\leftarrow \\theta + v,

    with ``U~`` the potential on a mini-batch of ``B`` of the ``N`` examples (likelihood scaled by
    ``N/B``), ``alpha`` the friction, ``epsilon_t`` the step size at step ``t`` and ``G`` the
    preconditioner: ``"vb"`` is the diagonal variational-Bayes preconditioner of Ke & Fan, *On the
    optimization and pruning for Bayesian deep learning* (2022), who show their adaptive VB update
    is this SGHMC; ``"rmsprop"`` is pSGLD's (Li et al., 2016); ``None`` is ``G = I``. See
    :mod:`.integrator` and :mod:`.preconditioners` for the maths.

    Models: a Bayesian network (a user's PyroModule with PyroSample weights and one observed site in
    a data plate, or a :class:`~pyro_subnet.nn.BayesianNet`; see :class:`~pyro_subnet.nn.ModelBridge`)
    runs on the fast path, its network on mini-batches the kernel draws (of ``subsample_size``, else
    the model's own plate's ``subsample_size``, else all data), with the model's own priors; a noise
    site (``sigma = pyro.sample("sigma", ...)``) is sampled too, through its transform to the real
    line. Any other Pyro model with continuous latent sites runs through traces, its mini-batches
    coming from its own ``pyro.plate("data", N, subsample_size=B)``. ``kernel.model`` (what
    ``arviz.from_pyro(mcmc)`` evaluates) is a *full-data*, batch-aware view: the model's own
    ``with_subsample_size(None)`` where it offers one (BayesianNet), else a
    :class:`~pyro_subnet.nn.bridge.BatchAwareModel`, so ArviZ gets the log-likelihood of all ``N``
    points at every draw.

    Warm-up: the first quarter (``warm_start_fraction``) climbs toward a mode with Adam; then the
    step size adapts (``adapt_step_size=True``, the default; :mod:`.step_size`): it
    is the largest one whose mini-batch gradient noise stays a small fraction of the injected
    noise and whose discretisation error on the stiffest direction is small, from running estimates of the gradient noise (two half-batches per step) and of the
    largest curvature (power iteration on Hessian-vector products); a divergence halves it. The
    preconditioner adapts too (``adapt_preconditioner="warmup"``). Both are frozen after warm-up,
    so that the chain targets the posterior. ``MCMC`` never calls
    ``end_warmup``; the kernel counts its own calls. Each call to :meth:`sample` makes
    ``steps_per_sample`` SGHMC steps (thinning inside the kernel).

    Divergences: a step whose potential is not finite or jumps by an energy no mini-batch noise
    explains is undone (back to the position before the move, velocity reset; see
    :mod:`.integrator`); in warm-up the step size then shrinks, after it the kernel counts them and
    warns once per chain at the end of the run, like Pyro's and Stan's HMC.

    Diagnostics (per chain, via ``mcmc.diagnostics()``): ``"divergences"`` (draw indices where a
    step was undone),
    ``"step_size"`` and ``"lp"`` (minus the mini-batch potential, averaged over the thinned
    steps) per draw. :func:`~pyro_subnet.infer.mcmc.sample_stats` turns them into ArviZ
    ``sample_stats`` arrays of shape ``(chain, draw)``.

    A noise hyperparameter (``BayesianNet(noise_scale=None)``) is learned by Monte-Carlo EM
    during warm-up (:meth:`_update_noise`), kept in ``model.likelihood.noise_scale``.

    :param model: a Pyro model with continuous latent sites (see above).
    :param step_size: ``epsilon`` (the learning rate on the full-data potential ``U``): with
        ``adapt_step_size`` the starting value of the adaptation (``None``: from the curvature
        at the starting point), else the step size of every step (``epsilon lambda_max(G H)``
        must stay well below 1, and ``epsilon G V`` below ``2 alpha`` for mini-batch gradient
        noise ``V``, or the chain's variances are inflated; the kernel warns).
    :param adapt_step_size: adapt the step size during warm-up (see above).
    :param warm_start_fraction: the first this fraction of the warm-up calls take Adam steps
        (learning rate ``warm_start_lr``) on the mini-batch potential instead of SGHMC steps, to
        reach the posterior's mass quickly (:mod:`.warm_start`); ``0`` starts SGHMC at once.
    :param step_size_options: options of the adaptation (:func:`.step_size.propose`):
        ``noise_ratio`` (0.2), ``curvature_ratio`` (0.25), ``quantile`` (0.9),
        ``curvature_every`` (steps between curvature estimates, default a tenth of warm-up).
    :param friction: ``alpha`` in ``(0, 1]`` (``1 - momentum``; ``1`` gives SGLD), or ``"auto"``
        (default): set with the step size, :math:`\\alpha = \\sqrt{\\epsilon \\lambda_{\\min}}` for the
        smallest prior precision :math:`\\lambda_{\\min}` (preconditioned), so that the flattest
        directions of the posterior, which set the predictive spread away from the data, are not
        overdamped (:mod:`.step_size`); ``0.1`` where the weights' priors are not all fixed Normals.
    :param preconditioner: ``"vb"``, ``"rmsprop"`` or ``None``.
    :param subsample_size: mini-batch size of the fast path (overrides the model's own).
    :param steps_per_sample: SGHMC steps per returned draw.
    :param step_size_schedule: ``None``/``"constant"``, ``"polynomial"``, ``"cyclical"`` or a callable
        ``t -> epsilon_t`` of the global step ``t`` (warm-up included); options in
        ``schedule_options`` (``decay_steps``, ``power``; ``cycle_length``).
    :param adapt_preconditioner: ``"warmup"`` (default), ``"always"`` or ``"never"``.
    :param preconditioner_options: keyword arguments of the preconditioner (``beta``, ...).
    :param init_strategy: Pyro init strategy for the trace path (the fast path starts from the
        bridge's initial weights: a BayesianNet's own network weights, else the prior draw of the
        model's trace, unless ``MCMC(initial_params=...)`` says otherwise).

    >>> import pyro, torch
    >>> from torch import nn
    >>> from pyro_subnet.nn import BayesianNet
    >>> model = BayesianNet(nn.Linear(2, 1), likelihood="regression", noise_scale=0.5)
    >>> x = torch.randn(100, 2); y = x @ torch.tensor([1.0, -1.0]) + 0.5 * torch.randn(100)
    >>> kernel = ps.infer.SGHMC(model, friction=0.5, subsample_size=20)
    >>> mcmc = pyro.infer.MCMC(kernel, num_samples=200, warmup_steps=200, disable_progbar=True)
    >>> mcmc.run(x, y)
    >>> mcmc.get_samples()["weight"].shape
    torch.Size([200, 1, 2])
    """

    #: diagnostics keys with one value per draw -> their ArviZ ``sample_stats`` names (read by
    #: :func:`pyro_subnet.to_inference_data`; ``lp`` there is the exact full-data log joint).
    per_draw_stats = {"step_size": "step_size", "lp": "lp_minibatch"}

    def __init__(self, model, step_size: Optional[float] = None, friction: Union[float, str] = "auto",
                 preconditioner=None,
                 subsample_size: Optional[int] = None, steps_per_sample: int = 1, step_size_schedule=None,
                 schedule_options: Optional[dict] = None, adapt_preconditioner: str = "warmup",
                 preconditioner_options: Optional[dict] = None, init_strategy=init_to_sample,
                 adapt_step_size: bool = True, step_size_options: Optional[dict] = None,
                 warm_start_fraction: float = 0.25, warm_start_lr: float = 1e-2):
        if friction != "auto" and not (isinstance(friction, (int, float)) and 0 < friction <= 1):
            raise ValueError(f"friction must be 'auto' or a number in (0, 1], got {friction!r}.")
        if not (isinstance(steps_per_sample, int) and steps_per_sample >= 1):
            raise ValueError(f"steps_per_sample must be a positive integer, got {steps_per_sample!r}.")
        if adapt_preconditioner not in ("warmup", "always", "never"):
            raise ValueError(f"adapt_preconditioner must be 'warmup', 'always' or 'never', got {adapt_preconditioner!r}.")
        check_model(model, type(self).__name__)
        if subsample_size is not None and (not isinstance(subsample_size, int) or subsample_size < 1):
            raise ValueError(f"subsample_size must be a positive integer or None, got {subsample_size!r}.")
        if step_size is None and not adapt_step_size:
            raise ValueError("SGHMC: give a step_size, or keep adapt_step_size=True to have warm-up find one.")
        options = dict(step_size_options or {})
        unknown = set(options) - {"noise_ratio", "curvature_ratio", "quantile", "curvature_every"}
        if unknown:
            raise ValueError(f"step_size_options: unknown option(s) {sorted(unknown)}; use noise_ratio, "
                             "curvature_ratio, quantile or curvature_every.")
        if not (isinstance(warm_start_fraction, (int, float)) and 0 <= warm_start_fraction < 1):
            raise ValueError(f"warm_start_fraction must be in [0, 1), got {warm_start_fraction!r}.")
        self.warm_start_fraction = float(warm_start_fraction)
        self.warm_start_lr = float(warm_start_lr)
        self.adapt_step_size = bool(adapt_step_size)
        self.step_size_options = options
        self.step_size = None if step_size is None else float(step_size)
        # The schedule's shape; with adaptation its level is the adapted step size.
        self.schedule = make_schedule(1.0 if step_size is None else step_size, step_size_schedule,
                                      **(schedule_options or {}))
        self.auto_friction = friction == "auto"
        self._given_friction = step_size_lib.FALLBACK_FRICTION if self.auto_friction else float(friction)
        self.preconditioner = make_preconditioner(preconditioner, **(preconditioner_options or {}))
        self.subsample_size = subsample_size
        self.steps_per_sample = steps_per_sample
        self.adapt_preconditioner = adapt_preconditioner
        self.init_strategy = init_strategy
        self._model = model
        # A full-data view for arviz.from_pyro / Predictive where the model offers one (same
        # weights and likelihood, no subsampling).
        view = getattr(model, "with_subsample_size", None)
        self.model = view(None) if callable(view) else BatchAwareModel(model)
        self.bridge = None        # the model's bridge (None: a model it cannot read, the trace path)
        self.transforms = None    # found in setup (MCMC calls setup(0, ...) to get them)
        self.layout = None
        self._user_initial = None
        self._initial = None
        self._resume = None
        self.noise_window = 200
        self._reset()

    # --------------------------------------------------------------------------------------------
    def _reset(self):
        self._t = 0               # calls of sample() in this run
        self._k = 0               # SGHMC steps of the chain (a resumed chain continues the count)
        self._divergences = []
        self._stats = {"step_size": [], "lp": []}
        self._state = None
        self._noise_var = None
        self._eps = None          # step-size adaptation state (step_size.StepSizeState)
        self._adam = None         # optimiser state of the warm start (warm_start.AdamState)
        self._warned = False
        self.friction = self._given_friction    # the current alpha ("auto": set with the step size)

    @property
    def initial_params(self) -> Dict[str, torch.Tensor]:
        return self._user_initial if self._user_initial is not None else self._initial

    @initial_params.setter
    def initial_params(self, params):
        self._user_initial = params

    def _log_prior(self):
        """The prior used in the potential (``None``: the model's own)."""
        return None

    def setup(self, warmup_steps, *args, **kwargs):
        self._reset()
        self._warmup_steps = warmup_steps
        x = args[0] if args else kwargs.get("x")
        y = args[1] if len(args) > 1 else kwargs.get("y")
        try:
            self.bridge = ModelBridge(self._model, x)
        except UnsupportedModelError:
            if self.subsample_size is not None:
                raise
            self.bridge = None    # any other model with continuous latents: through its traces
        if self.bridge is not None:
            self._setup_bridge(x, y)
        self._after_bridge()
        if self.bridge is None:
            self._initial, self.transforms, self.layout = setup_trace_model(self._model, args, kwargs,
                                                                            self.init_strategy)
            self.potential = TracePotential(self._model, args, kwargs, self.transforms, self.layout)
        self._state = None
        if self._resume is not None:
            self._restore(self._resume)
            self._resume = None

    def _after_bridge(self):
        """Hook for subclasses, once the model is read (before a saved chain is restored)."""

    def _setup_bridge(self, x, y):
        """The fast path: the bridge's network on kernel-drawn mini-batches (of ``subsample_size``,
        else the model's own plate's, else all data). A noise site is one more coordinate, its
        unconstrained value last in ``theta``."""
        bridge = self.bridge
        batch = self.subsample_size if self.subsample_size is not None else bridge.subsample_size
        sample_noise = bridge.noise_site is not None
        self.potential = NetPotential(bridge, x, y, batch, log_prior=self._log_prior(), sample_noise=sample_noise)
        ref = self.potential.x
        self.transforms = bridge.transforms()
        initial = {n: v.to(dtype=ref.dtype, device=ref.device) for n, v in bridge.initial_values().items()}
        sites = list(bridge.layout.shapes.items())
        if sample_noise:
            noise = bridge.noise
            sites.append((bridge.noise_site, noise.shape))
            sigma = torch.full(noise.shape, float(bridge.likelihood.noise_scale), dtype=ref.dtype, device=ref.device)
            initial[bridge.noise_site] = self.transforms[bridge.noise_site](sigma)
        self.layout = SiteLayout(sites)
        self._initial = initial

    def _flatten(self, params) -> torch.Tensor:
        ref = next(iter(self._initial.values()))
        return self.layout.flatten(params).to(dtype=ref.dtype, device=ref.device)

    def _adapting(self) -> bool:
        if self.adapt_preconditioner == "never" or not self.preconditioner.adaptive:
            return False
        return self.adapt_preconditioner == "always" or self._t < self._warmup_steps

    def _mask(self):
        return None

    def _after_step(self, state):
        """Hook for subclasses (the EM update); returns the state to continue from."""
        return state

    # --------------------------------------------------------------------------------------------
    # step size
    def _warming_up(self) -> bool:
        return self._t < self._warmup_steps

    def _curvature_every(self) -> int:
        every = self.step_size_options.get("curvature_every")
        return int(every) if every else max(20, self._warmup_steps * self.steps_per_sample // 10)

    def _estimate_curvature(self, num_iterations: int):
        state = self._eps
        hvp = lambda v: self.potential.hvp(self._state.theta, v)  # noqa: E731
        lam, vec = step_size_lib.lambda_max(hvp, self._state.precond.scale, state.eigvec, num_iterations)
        self._eps = step_size_lib.observe_curvature(state, lam, vec)

    def _propose(self):
        opts = {k: v for k, v in self.step_size_options.items() if k != "curvature_every"}
        self._eps, self.friction = step_size_lib.propose(self._eps, self._state.precond.scale, self.friction,
                                                         curvature_floor=self._curvature_floor(), **opts)

    def _prior_precision(self) -> Optional[torch.Tensor]:
        """``(D_w,)`` precisions of the weights' priors where every weight site has a fixed Normal
        prior (the bridge's Gaussian view), else ``None``."""
        if self.bridge is None:
            return None
        parts = {}
        for n in self.bridge.layout.names:
            normal = self.bridge.site_normal(n)
            if normal is None:
                return None
            parts[n] = normal[1].pow(-2).expand(self.bridge.layout.shapes[n])
        return self.bridge.layout.flatten(parts)

    def _curvature_floor(self) -> Optional[float]:
        """Under ``friction="auto"``: the smallest prior precision in the preconditioned coordinates,
        :math:`\\min_j G_j p_j`, a lower bound of the posterior's flattest curvature; ``None``
        otherwise (or without a Normal prior on every weight: the friction stays 0.1)."""
        prior_prec = self._prior_precision() if self.auto_friction else None
        if prior_prec is None:
            return None
        scale = self._state.precond.scale
        return float((scale[:prior_prec.numel()] * prior_prec.to(scale)).min())

    def _start_adaptation(self):
        """At the first step of a chain: the curvature at the starting point bounds the first
        steps (the given step size, if smaller, is where they start)."""
        self._eps = step_size_lib.init(self.step_size if self.step_size is not None else step_size_lib.MAX_STEP_SIZE)
        floor = self._curvature_floor()
        if floor is not None and self.step_size is not None:
            self.friction = step_size_lib.friction_for(self.step_size, floor)
        if self._warm_start_calls() > 0:
            return      # the optimiser goes first; the adaptation starts where it ends
        if self.adapt_step_size and (self._warmup_steps > 0 or self.step_size is None):
            self._estimate_curvature(20)
            given = self._eps.step_size
            self._propose()
            self._eps = self._eps._replace(step_size=min(given, self._eps.step_size))
            if self._warmup_steps == 0:
                warnings.warn(f"{type(self).__name__}: adapt_step_size without warm-up steps uses the step size the "
                              f"curvature at the starting point allows ({self._eps.step_size:.3g}); give warmup_steps "
                              "so that it can adapt to the posterior.", RuntimeWarning, stacklevel=3)

    def _step_size_now(self) -> float:
        if not self.adapt_step_size:
            return float(self.schedule(self._k))
        return self._eps.step_size * float(self.schedule(self._k)) / float(self.schedule(0))

    def _adapt_after_step(self, info):
        if not self._warming_up():
            return
        noise = self.potential.last_grad_noise
        if noise is not None and not info.diverging:
            self._eps = step_size_lib.observe_noise(self._eps, noise)
        if not self.adapt_step_size:
            return
        if info.diverging:
            self._eps = step_size_lib.backoff(self._eps)
            return
        if self._k % self._curvature_every() == 0:
            self._estimate_curvature(5)
        if self._k % 10 == 0:
            self._propose()

    def _end_warmup(self):
        self.potential.estimate_noise = False
        if self.adapt_step_size:
            self._propose()
        kappa = step_size_lib.noise_ratio(self._step_size_now(), self._state.precond.scale,
                                          step_size_lib.grad_noise(self._eps), self.friction)
        if kappa is not None:
            over = float((kappa > 1).double().mean())
            if over > 0.1:
                warnings.warn(f"{type(self).__name__}: at step size {self._step_size_now():.3g} the mini-batch gradient "
                              f"noise exceeds the injected noise for {100 * over:.0f}% of the coordinates, so the "
                              "chain's spread there is inflated; keep adapt_step_size=True, lower step_size or "
                              "use larger mini-batches.", RuntimeWarning, stacklevel=3)

    def sample(self, params):
        theta = self._flatten(params)
        if self._state is None:
            self._state = integrator.init(theta, self.preconditioner)
            if self._eps is None:
                self._start_adaptation()
        elif not torch.equal(theta, self._state.theta):
            self._state = self._state._replace(theta=theta.detach())   # params changed from outside
        if self._t < self._warm_start_calls():
            return self._warm_start_sample(params)
        if self._t == self._warm_start_calls() and self._t > 0:
            self._restart_adaptation()
        # Gradient noise is estimated in warm-up: it sets the step size (every step), or for a fixed
        # one only feeds the warning at the end of warm-up (every FIXED_STEP_NOISE_EVERY-th step:
        # the estimate costs a second backward pass).
        warming = self._warming_up()
        lp_sum, diverged = 0.0, False
        for _ in range(self.steps_per_sample):
            self.potential.estimate_noise = warming and (self.adapt_step_size or
                                                         self._k % FIXED_STEP_NOISE_EVERY == 0)
            eps = self._step_size_now()
            self._state, info = integrator.step(self._state, self.potential, eps, self.friction,
                                                self.preconditioner, self._adapting(), self._mask())
            self._state = self._after_step(self._state)
            self._update_noise()
            self._k += 1
            self._adapt_after_step(info)
            diverged |= info.diverging
            lp_sum += -info.potential if math.isfinite(info.potential) else 0.0
        if self._t >= self._warmup_steps:
            draw = self._t - self._warmup_steps
            if diverged:
                self._divergences.append(draw)
            self._record(eps, lp_sum / self.steps_per_sample)
        self._t += 1
        if self._t == self._warmup_steps:
            self._end_warmup()
        return self._as_params(params)

    def _as_params(self, params):
        """The chain's position as the sites of ``params`` (extra keys the caller stored kept)."""
        out = self.layout.unflatten(self._state.theta)
        return {**{k: v for k, v in params.items() if k not in out}, **out}

    def _warm_start_calls(self) -> int:
        return int(self.warm_start_fraction * self._warmup_steps)

    def _warm_start_sample(self, params):
        """A warm-up call of the optimiser phase: ``steps_per_sample`` Adam steps. A learned
        noise (a noise site or an EM hyperparameter) is held small for the first part of this
        phase and then restarted at the residuals' scale (:func:`.warm_start.held_noise`)."""
        self.potential.estimate_noise = False
        hold = self._noise_hold_calls()
        if self._t == 0 and hold:
            self._set_noise(warm_start.held_noise(self._noise_now(), self.potential.y))
        if self._t == hold and hold:     # released: from the scale the fitted weights imply
            weights = self._state.theta[:self.potential.num_weights]
            self._set_noise(residual_scale(self.bridge, weights, self.potential.x, self.potential.y,
                                           self.potential.batch_size))
            self._adam = None            # the data term's scale changed: fresh moments
        adam = self._adam if self._adam is not None else warm_start.init(self._state.theta)
        holding = self._t < hold and self.potential.sample_noise
        potential = warm_start.holding_last(self.potential) if holding else self.potential
        for _ in range(self.steps_per_sample):
            adam, _ = warm_start.step(adam, potential, self.warm_start_lr)
            if self._t >= hold:
                self._update_noise()
            self._k += 1
        self._adam = adam
        self._state = self._state._replace(theta=adam.theta, previous=None, last_potential=None)
        self._t += 1
        return self._as_params(params)

    def _noise_hold_calls(self) -> int:
        """Warm-start calls with the noise held (none without a learned regression noise)."""
        learned = isinstance(self.potential, NetPotential) and (self.potential.sample_noise or self._learns_noise())
        return int(warm_start.NOISE_HOLD_FRACTION * self._warm_start_calls()) if learned else 0

    def _noise_now(self) -> float:
        if self.potential.sample_noise:
            site = self.bridge.noise_site
            unconstrained = self.layout.unflatten(self._state.theta)[site].detach()
            return float(self.transforms[site].inv(unconstrained).reshape(-1)[0])
        return float(self.bridge.likelihood.noise_scale)

    def _set_noise(self, sigma: float) -> None:
        """Put a learned noise at ``sigma``: the chain's noise coordinate, else the EM estimate."""
        if self.potential.sample_noise:
            theta = self._state.theta.clone()
            theta[self.potential.num_weights:] = self.transforms[self.bridge.noise_site](torch.tensor(sigma).to(theta))
            self._state = self._state._replace(theta=theta, previous=None, last_potential=None)
        else:
            self._noise_var = sigma ** 2
            self.bridge.likelihood.set_noise_scale(sigma)

    def _restart_adaptation(self):
        """After the optimiser phase: the curvature where the chain now is bounds the first steps."""
        self._adam = None
        if self.adapt_step_size:
            self._estimate_curvature(20)
            self._propose()

    @property
    def adapted_step_size(self) -> Optional[float]:
        """The step size the last chain used after warm-up (``None`` before a run)."""
        if self._eps is None:
            return self.step_size
        return self._eps.step_size if self.adapt_step_size else self.step_size

    def _learns_noise(self) -> bool:
        """A noise hyperparameter (no noise site) is learned by EM during warm-up."""
        bridge = self.bridge
        return bridge is not None and bridge.noise_site is None and getattr(bridge.likelihood, "learn_noise", False)

    def _update_noise(self):
        """Monte-Carlo EM for a learned noise scale (``noise_scale=None``), during warm-up only:
        :math:`\\sigma^2` tracks the running mean of the mini-batch mean squared residual at the
        chain's current draws, :math:`\\sigma^2 \\approx E_{p(\\theta|y)}[\\|y - f(x;\\theta)\\|^2] / N`,
        the M-step of EM with the draws as the E-step. After warm-up it stays fixed, so the
        chain targets one posterior."""
        if not self._learns_noise() or self._t >= self._warmup_steps or self.potential.last_mse is None:
            return
        mse = self.potential.last_mse
        # A running mean over roughly the last ``noise_window`` steps (an epoch or more).
        rate = max(1.0 / (self._k + 1), 1.0 / self.noise_window)
        self._noise_var = mse if self._noise_var is None else (1 - rate) * self._noise_var + rate * mse
        self.bridge.likelihood.set_noise_scale(max(self._noise_var, 1e-12) ** 0.5)

    def _record(self, eps, lp):
        self._stats["step_size"].append(eps)
        self._stats["lp"].append(lp)

    def logging(self):
        eps = self._step_size_now() if self._eps is not None or not self.adapt_step_size else float("nan")
        return OrderedDict([("step size", f"{eps:.2e}"), ("div", len(self._divergences))])

    def diagnostics(self):
        return {"divergences": list(self._divergences), "acceptance rate": 1.0,
                **{k: list(v) for k, v in self._stats.items()}}

    # --------------------------------------------------------------------------------------------
    # persistence: save a chain, continue it later
    def state_dict(self) -> Dict[str, object]:
        """The state of the last chain this kernel ran in this process: position, velocity,
        preconditioner, step count, learned noise and the mini-batch order (SpikeSlabSGHMC adds
        its EM state and pruning mask). Plain tensors and numbers, for ``torch.save``.

        To continue the chain: build the kernel the same way (on the same model, data and
        options), ``kernel.load_state_dict(state)``, then run ``pyro.infer.MCMC(kernel,
        warmup_steps=0, num_samples=...)`` on the same data: the first draw follows the saved one,
        exactly as the uninterrupted chain would (given the same random stream)."""
        if self._state is None:
            raise RuntimeError(f"{type(self).__name__}.state_dict(): run MCMC with this kernel first.")
        s = self._state
        out = {"theta": s.theta, "velocity": s.velocity, "precond_scale": s.precond.scale,
               "precond_curvature": s.precond.curvature, "precond_count": s.precond.count,
               "step_size": s.step_size, "noise": s.noise, "num_steps": self._k, "noise_var": self._noise_var,
               "noise_scale": getattr(self.bridge.likelihood, "noise_scale", None) if self.bridge is not None else None,
               "step_size_state": None if self._eps is None else tuple(self._eps), "friction": self.friction}
        order = getattr(self.potential, "batch_order", None)
        if order is not None:
            out["batch_order"] = order()
        return out

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Continue from ``state`` (see :meth:`state_dict`) in the next ``MCMC`` run."""
        missing = [k for k in ("theta", "velocity", "precond_scale", "num_steps") if k not in state]
        if missing:
            raise ValueError(f"{type(self).__name__}.load_state_dict: not a kernel state (missing {missing}).")
        self._resume = dict(state)

    def _restore(self, state) -> None:
        ref = next(iter(self._initial.values()))
        cast = lambda t: None if t is None else t.to(dtype=ref.dtype, device=ref.device)  # noqa: E731
        theta = cast(state["theta"])
        if theta.shape != (self.layout.dim,):
            raise ValueError(f"{type(self).__name__}: the saved chain has {theta.shape[-1]} coordinates, this model "
                             f"{self.layout.dim}; build the kernel on the same model.")
        precond = PreconditionerState(cast(state["precond_scale"]), cast(state["precond_curvature"]),
                                      int(state["precond_count"]))
        self._state = integrator.SGHMCState(theta, cast(state["velocity"]), precond, float(state["step_size"]),
                                            cast(state["noise"]))
        self._initial = self.layout.unflatten(theta)
        self._k = int(state["num_steps"])
        self._noise_var = state["noise_var"]
        if state.get("friction") is not None:
            self.friction = float(state["friction"])
        if state.get("step_size_state") is not None:
            eps = step_size_lib.StepSizeState(*state["step_size_state"])
            self._eps = eps._replace(grad_noise=cast(eps.grad_noise), eigvec=cast(eps.eigvec))
        if state.get("noise_scale") is not None and self._learns_noise():
            self.bridge.likelihood.set_noise_scale(state["noise_scale"])
        if "batch_order" in state and hasattr(self.potential, "set_batch_order"):
            self.potential.set_batch_order(state["batch_order"])

    def cleanup(self):
        """End of a chain: warn if the draws' log density still drifts, and (once) if steps after
        warm-up diverged. The chain's final state
        stays (state_dict() reads it); setup() resets it for the next chain."""
        if self._warned:          # Pyro calls cleanup more than once per chain
            return
        z = step_size_lib.drift_z_score(self._stats["lp"])
        if math.isfinite(z) and abs(z) > 4:
            warnings.warn(f"{type(self).__name__}: the chain's log density still drifts during sampling (Geweke z = "
                          f"{z:.1f}: the first tenth of the draws {'below' if z < 0 else 'above'} the last half), so "
                          "the early draws are not from the posterior; increase warmup_steps (or start nearer the "
                          "posterior, e.g. MCMC(initial_params=...) at a MAP).", RuntimeWarning, stacklevel=2)
        n = len(self._divergences)
        drawn = max(self._t - self._warmup_steps, 0)
        self._warned = True
        if n:
            warnings.warn(f"{type(self).__name__}: {n} of {drawn} draws after warm-up had a divergent step (undone: "
                          f"back to the last position, velocity reset). The step size "
                          f"{self._step_size_now():.3g} is too large for parts of the posterior: keep "
                          "adapt_step_size=True with more warmup_steps, or lower step_size.", RuntimeWarning,
                          stacklevel=2)
