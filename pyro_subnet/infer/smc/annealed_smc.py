"""``AnnealedSMC``: the Pyro-``MCMC``-like shell over the data-annealed SMC step."""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, NamedTuple, Optional, Union

import torch
from pyro.infer.mcmc.util import print_summary
from tqdm.auto import tqdm

from ...nn import SiteLayout
from ...nn.bridge import BatchAwareModel, ModelBridge, check_model
from .. import distributed, draws
from ..autoguide.diagonal_laplace import AutoDiagonalLaplace
from ..randomness import resolve_seed
from . import annealed
from .annealed import AnnealedTarget, Move
from .data_schedules import Adaptive, DataPath, Linear
from .particle_likelihood import particle_log_lik, particle_outputs
from .resampling import get_resampler

SCHEDULES = ("full", "linear", "adaptive")
#: The named starts of :class:`AnnealedSMC` (else a fitted diagonal Gaussian guide).
STARTS = ("auto", "prior", "laplace")


def _data_fingerprint(x: torch.Tensor, y: torch.Tensor) -> tuple:
    """A cheap check that a resumed run sees the data it was started on."""
    return (tuple(x.shape), tuple(y.shape), float(x.double().sum()), float(y.double().sum()))


class SMCKernel:
    """What ``arviz.from_pyro`` and Pyro-style code read as ``smc.kernel``: the model and the move."""

    def __init__(self, model, move: Move):
        self.model = model
        self.move = move

    def __repr__(self):
        return f"SMCKernel({self.move!r})"


def auto_start(learns_noise: bool) -> str:
    """What ``start="auto"`` means for a model: ``"laplace"`` where it learns its noise scale, else
    ``"prior"`` (see :meth:`AnnealedSMC._start_reference` for why)."""
    return "laplace" if learns_noise else "prior"


class DiagonalGaussian(NamedTuple):
    """A diagonal Gaussian over the flat weights, :math:`\\mathcal N(\\text{mean}, \\text{diag}(\\text{var}))`:
    a ``start`` of :class:`AnnealedSMC`."""
    mean: torch.Tensor     # (D,)
    var: torch.Tensor      # (D,) positive


def _start_gaussian(start, dim: Optional[int] = None, like: Optional[torch.Tensor] = None) -> torch.distributions.Normal:
    """The diagonal Gaussian ``N(mean, diag(var))`` of ``start`` (see :class:`AnnealedSMC`'s
    ``start``), checked; with ``dim``, checked against the model's weights and cast like ``like``."""
    post = start.flat_posterior() if hasattr(start, "flat_posterior") else start
    mean, var = getattr(post, "mean", None), getattr(post, "var", None)
    if not (torch.is_tensor(mean) and torch.is_tensor(var) and mean.dim() == 1 and var.shape == mean.shape):
        raise TypeError(f"AnnealedSMC: start must be a fitted guide with flat_posterior() (e.g. "
                        f"ps.infer.AutoDiagonalLaplace) or an object with mean and var tensors (D,), got "
                        f"{type(start).__name__}.")
    if getattr(post, "factor", None) is not None or not bool((var > 0).all() and torch.isfinite(var).all()):
        raise ValueError("AnnealedSMC: start must be a diagonal Gaussian with positive variances on every weight "
                         "(e.g. ps.infer.AutoDiagonalLaplace); a subnetwork or low-rank posterior leaves weights "
                         "without spread.")
    if dim is not None and mean.numel() != dim:
        raise ValueError(f"AnnealedSMC: start has {mean.numel()} weights, the model {dim}; was it fitted to this "
                         "model?")
    if like is not None:
        mean, var = mean.detach().to(like), var.detach().to(like)
    return torch.distributions.Normal(mean, var.sqrt())


def _start_noise(start, num_data: int) -> Optional[tuple]:
    """``(mean, var)`` of the start density of ``log sigma`` for a learned noise: at a fitted
    guide's noise scale, with the Laplace variance of a Gaussian likelihood in ``log sigma``,
    ``1 / (2N)`` (its curvature there is ``2 sum_n r_n^2 / sigma^2 = 2N``); ``None`` (the noise
    starts from its prior) for a start without one. Started from its prior, the noise of particles
    whose weights start at the data's fit is free in the early targets, with few data, to grow
    until it explains the signal, and they settle there (the trap :func:`fit_map`'s warm-up avoids)."""
    noise = getattr(start, "noise_scale", None)
    if not (torch.is_tensor(noise) and noise.numel() == 1 and float(noise) > 0):
        return None
    return math.log(float(noise)), 1.0 / (2 * num_data)


def _reference_log_prob(reference: torch.distributions.Normal, noise_log_prob=None):
    """``theta (P, D [+ 1]) -> (P,)``: the start density of the weights, times the start density
    of the noise for a learned noise (the last coordinate: :func:`_start_noise`, else its prior)."""
    dim = reference.loc.shape[-1]

    def log_q(t):
        lq = reference.log_prob(t[:, :dim]).sum(-1)
        return lq if noise_log_prob is None else lq + noise_log_prob(t[:, -1])
    return log_q


class AnnealedSMC:
    """Sequential Monte Carlo over a :class:`~pyro_subnet.nn.BayesianNet`'s weights, with the data
    brought in mini-batch by mini-batch (data annealing).

    The targets are :math:`\\pi_t(\\theta) \\propto p(\\theta) \\prod_{b < B_t} p(D_b \\mid \\theta)
    \\, p(D_{B_t} \\mid \\theta)^{\\phi_t}` over a fixed random order of the training data split
    into batches of ``batch_size``. Particles start from the prior; each step reweights them by the
    likelihood of the newly included data, resamples when the ESS falls below
    ``ess_threshold * num_particles``, and moves them with MALA or HMC steps that target the
    current partial posterior using only the data included so far (so early steps are cheap). The
    product of the mean incremental weights estimates the evidence :math:`p(D)`.
    See :mod:`~pyro_subnet.infer.smc.annealed` for the equations. Method: Millard, Murphy, Green,
    Maskell (2026), *Investigating Batch Inference in a Sequential Monte Carlo Framework for
    Neural Networks*; structure after BlackJAX's tempered / partial-posteriors SMC.

    All particles are evaluated together (``model.log_likelihood`` vmaps the functional network
    over the ``(P, D)`` particle tensor); the chains are independent SMC runs. Draws are in the
    model's (unconstrained, real) weight space, so ``get_samples`` returns the model's sites.

    :param model: a :class:`~pyro_subnet.nn.BayesianNet` (the fast functional path is used).
    :param num_particles: particles per chain ``P`` (= draws per chain).
    :param batch_size: examples per data batch (ignored by ``"full"``); ``None``: a tenth of the
        data (rounded up).
    :param schedule: ``"full"`` (adaptive likelihood tempering on all data, the full-batch
        baseline), ``"linear"`` (``batches_per_step`` whole batches per step) or ``"adaptive"``
        (as much new data as keeps the ESS at the threshold, the newest batch tempered).
    :param move: ``"hmc"`` (default) or ``"mala"``.
    :param ess_threshold: resampling threshold (and adaptive target) as a fraction of ``P``.
    :param resampling: ``"systematic"``, ``"stratified"``, ``"multinomial"`` or a function
        ``(generator, weights, num_samples) -> indices``.
    :param num_chains: independent SMC runs.
    :param num_mcmc_steps: kernel steps per SMC step at least, and per round of adaptive moves.
    :param num_leapfrog_steps: HMC leapfrog steps.
    :param step_size: initial step size, in units of the particle spread (adapted).
    :param target_accept: acceptance rate for step-size adaptation (default 0.574 MALA, 0.65 HMC).
    :param batches_per_step: batches per step of the ``"linear"`` schedule.
    :param batch_growth: ``"adaptive"`` only: the data enter in stages of batches, each stage
        ``batch_growth - 1`` times the data already in, tempered together (1: one batch per stage;
        2: the data double from stage to stage, which takes fewer steps and fewer
        example-gradients than one batch per stage; see :class:`~.data_schedules.Adaptive`, and
        ``docs/measured.md`` for the figures).
    :param max_steps: safety limit on SMC steps per chain (error if exceeded).
    :param max_mcmc_steps: most move steps per SMC step (default ``10 * num_mcmc_steps``): after
        each ``num_mcmc_steps`` the moves go on until the particles decorrelate from where the
        step started (see :mod:`.annealed`); ``num_mcmc_steps`` makes the number fixed.
    :param target_correlation: the decorrelation the moves aim for (correlation over particles of
        the log density before and after them). If the moves run out of steps above it in more
        than a quarter of the SMC steps, :meth:`run` warns that the particles have not mixed.
    :param covariance: the moves' proposal covariance (see :mod:`.proposal_covariance`):
        ``"curvature"`` (default; per coordinate, the inverse root of the particles' mean squared
        gradient, the local width of the posterior), ``"diagonal"`` (the population's
        per-coordinate spread) or ``"particles"`` (its low-rank covariance shrunk toward the
        diagonal).
    :param seed: seed of the sampler's generator (``None``: drawn from torch's global RNG); the
        prior draws use torch's global RNG.
    :param progress: show a progress bar (data included, ESS, acceptance).
    :param start: where the particles start: ``"auto"`` (default) a Laplace approximation
        (``"laplace"``: an :class:`~pyro_subnet.infer.AutoDiagonalLaplace` fitted at :meth:`run`)
        where the model learns its noise scale, else the prior (``"prior"`` or ``None``); or a
        diagonal Gaussian over the flat weights, a fitted guide with ``flat_posterior()`` such as
        :class:`~pyro_subnet.infer.AutoDiagonalLaplace` (or an object with ``mean`` and ``var``,
        variances positive). The targets then bridge from that Gaussian ``q`` to the posterior as
        the data come in, :math:`\\pi_s \\propto q^{1 - s/B} p^{s/B} \\prod_b p(D_b \\mid \\theta)^{c_b(s)}`
        (:class:`~.annealed.AnnealedTarget`'s ``log_reference``): the particles begin where the
        posterior's mass is instead of walking there from the prior, and the weights and the
        evidence estimate stay those of an SMC sampler (the evidence is still :math:`p(D)`).

    A regression model with ``noise_scale=None`` gets its noise as one more latent per particle,
    :math:`\\log\\sigma \\sim \\mathcal{N}(\\log\\sigma_0, 1)` around the likelihood's current value;
    its draws are in ``noise_samples`` ``(num_chains, P)`` and the likelihood keeps their
    root-mean-square after :meth:`run`.

    Under ``torch.distributed`` (launched with ``torchrun``, :func:`pyro_subnet.infer.distributed.init`
    called) every rank calls ``run`` with the whole data set and holds ``P / world_size`` of the
    particles; weights, ESS, evidence and resampling are global (see :mod:`.annealed`), and at the
    end every rank holds all ``P`` draws. With the same ``seed`` the random stream does not depend
    on the number of ranks: short runs give the same draws up to rounding; long ones may drift
    apart where a rounding difference flips an accept/reject decision, sampling the same posterior.

    >>> from torch import nn
    >>> from pyro_subnet.nn import BayesianNet
    >>> model = BayesianNet(nn.Linear(2, 1), "regression", noise_scale=0.5)
    >>> x = torch.randn(40, 2); y = x @ torch.tensor([1.0, -1.0]) + 0.5 * torch.randn(40)
    >>> smc = ps.infer.AnnealedSMC(model, num_particles=64, batch_size=10, schedule="adaptive", progress=False)
    >>> smc.run(x, y)
    >>> smc.get_samples()["weight"].shape
    torch.Size([64, 1, 2])
    """

    def __init__(self, model, num_particles: int = 256, batch_size: Optional[int] = None,
                 schedule: str = "adaptive", move: str = "hmc", ess_threshold: float = 0.5,
                 resampling="systematic", num_chains: int = 1, *, num_mcmc_steps: int = 5,
                 num_leapfrog_steps: int = 10, step_size: float = 0.5, target_accept: Optional[float] = None,
                 batches_per_step: int = 1, batch_growth: float = 1.0, max_steps: int = 10000,
                 seed: Optional[int] = None, progress: bool = True, max_mcmc_steps: Optional[int] = None,
                 target_correlation: float = 0.5, covariance: str = "curvature", start="auto"):
        check_model(model, 'AnnealedSMC')
        self.start = "prior" if start is None else start
        if isinstance(self.start, str):
            if self.start not in STARTS:
                raise ValueError(f"AnnealedSMC: start={start!r}: choose one of {STARTS} or pass a fitted diagonal "
                                 "Gaussian guide (e.g. ps.infer.AutoDiagonalLaplace).")
        else:
            _start_gaussian(self.start)       # fail early on a start that is not a diagonal Gaussian
        if not isinstance(num_particles, int) or num_particles < 2:
            raise ValueError(f"num_particles must be an integer >= 2, got {num_particles!r}.")
        if not isinstance(num_chains, int) or num_chains < 1:
            raise ValueError(f"num_chains must be a positive integer, got {num_chains!r}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}: choose one of {SCHEDULES}.")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None (a tenth of the data), got "
                             f"{batch_size!r}.")
        if not 0 < ess_threshold < 1:
            raise ValueError(f"ess_threshold must be in (0, 1), got {ess_threshold!r}.")
        if not (step_size > 0 and math.isfinite(step_size)):
            raise ValueError(f"step_size must be a positive number, got {step_size!r}.")
        if not (isinstance(batch_growth, (int, float)) and math.isfinite(batch_growth) and batch_growth >= 1):
            raise ValueError(f"batch_growth must be a number >= 1 (1: one batch per stage), got {batch_growth!r}.")
        if batch_growth != 1 and schedule != "adaptive":
            raise ValueError(f"batch_growth applies to schedule='adaptive' only (got schedule={schedule!r}).")
        get_resampler(resampling)  # fail early on an unknown scheme
        self._model = model
        # What arviz.from_pyro evaluates: a batch-aware view unless the model is one itself.
        view = model if hasattr(model, "with_subsample_size") else BatchAwareModel(model)
        if max_mcmc_steps is None:
            max_mcmc_steps = 10 * num_mcmc_steps if isinstance(num_mcmc_steps, int) else num_mcmc_steps
        self.kernel = SMCKernel(view, Move(move, num_mcmc_steps, num_leapfrog_steps, target_accept, max_mcmc_steps,
                                           target_correlation, covariance))
        self.num_particles = num_particles
        self.num_samples = num_particles      # draws per chain, as MCMC.num_samples
        self.num_chains = num_chains
        self.batch_size = batch_size
        self.schedule = schedule
        self.ess_threshold = ess_threshold
        self.resampling = resampling
        self.step_size = float(step_size)
        self.batches_per_step = batches_per_step
        self.batch_growth = float(batch_growth)
        self.max_steps = max_steps
        self.seed = seed
        self.progress = progress
        self._schedule_rule = Linear(batches_per_step) if schedule == "linear" else Adaptive(ess_threshold)
        self._args, self._kwargs = (), {}
        self._samples = None
        self._infos: List[List[annealed.SMCInfo]] = []
        self.log_evidence: Optional[torch.Tensor] = None
        self.noise_samples: Optional[torch.Tensor] = None
        self._run: Optional[dict] = None       # seed, data checksum, finished chains, an unfinished one
        self.bridge = None                      # the model's bridge, from the data of run()

    @property
    def model(self):
        return self._model

    # ----------------------------------------------------------------------------------------
    def run(self, x, y, *, checkpoint: Optional[str] = None, checkpoint_every: int = 10, resume: bool = False,
            **kwargs):
        """Run ``num_chains`` independent SMC samplers on the data ``(x, y)``.

        :param x: inputs ``(N, ...)``.
        :param y: targets ``(N,)`` (or ``(N, O)`` for regression). The arguments are kept
            (``_args``) for ``arviz.from_pyro`` and ``Predictive``.
        :param checkpoint: a file path: every ``checkpoint_every`` SMC steps and after every chain the
            sampler's :meth:`state_dict` is written there (``torch.save``), so that a run that is
            interrupted can be continued (under ``torch.distributed`` each rank writes
            ``<path>.rank<r>``, its own share of the particles).
        :param checkpoint_every: SMC steps between checkpoints.
        :param resume: continue the unfinished run this object holds (after ``load_state_dict`` of a
            checkpoint, or after an interruption) instead of starting afresh: from the saved
            particles, weights, step size and random stream, so that it ends exactly where the
            uninterrupted run would. The data must be the same.
        """
        if kwargs:
            raise TypeError(f"AnnealedSMC.run takes (x, y) only, got keyword arguments {sorted(kwargs)}.")
        if not (isinstance(checkpoint_every, int) and checkpoint_every >= 1):
            raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}.")
        self.bridge = bridge = ModelBridge(self.model, x)
        x, y = bridge.check(x, y)
        if y is None:
            raise ValueError("AnnealedSMC.run needs targets y: the likelihood brings the data in.")
        self._args, self._kwargs = (x, y), {}
        fingerprint = _data_fingerprint(x, y)
        if resume:
            run = self._run
            if run is None or len(run["finished"]) == self.num_chains:
                raise ValueError("AnnealedSMC.run(resume=True): there is no unfinished run to continue; load a "
                                 "checkpoint with load_state_dict first, or call run without resume.")
            if run["data"] != fingerprint:
                raise ValueError("AnnealedSMC.run(resume=True): these are not the data the saved run was started "
                                 f"on (N={x.shape[0]} and checksum differ from the checkpoint's); pass the same x, y.")
        else:
            seed = resolve_seed(self.seed)     # one shared stream for all ranks
            learned = getattr(bridge.likelihood, "learn_noise", False)
            noise = "site" if bridge.noise_site is not None else ("hyper" if learned else None)
            run = {"seed": seed, "data": fingerprint, "noise": noise, "noise_site": bridge.noise_site,
                   "noise_loc": math.log(bridge.likelihood.noise_scale) if noise == "hyper" else None,
                   "layout": list(bridge.layout.shapes.items()), "finished": [], "current": None}
            # The start is fixed once per run (and saved with it), so a resumed run keeps it.
            reference, noise_start = self._start_reference(bridge, x, y, noise, seed)
            run["start"] = None if reference is None else {"mean": reference.loc, "var": reference.scale ** 2,
                                                           "log_noise": noise_start}
        self._run = run
        self._checkpoint_path = checkpoint
        for chain in range(len(run["finished"]), self.num_chains):
            current = run["current"] if run["current"] is not None and run["current"]["chain"] == chain else None
            run["finished"].append(self._run_chain(chain, x, y, current, checkpoint_every))
            run["current"] = None
            self._save_checkpoint()
        self._finish(x.dtype)

    def _start_reference(self, bridge, x, y, noise, seed: int):
        """The diagonal Gaussian the particles' weights start from (``None``: the prior) and, for a
        learned noise, the start of ``log sigma`` (:func:`_start_noise`; ``None``: its prior). ``"auto"``:
        an :class:`~pyro_subnet.infer.AutoDiagonalLaplace` fitted here where the model learns its
        noise (its noise kept at the MAP's, ``noise="map"``, where the start of ``log sigma`` is
        centred), the prior otherwise. From the prior, the annealed targets with few data favour a
        large noise that explains the signal; the particles settle there as the data come in and
        local moves do not leave that mode (``docs/measured.md``: the noise posterior 2.8x Pyro
        NUTS's on the gap network). Started at the Laplace approximation, whose MAP fits the data
        with a small noise (:func:`~pyro_subnet.infer.fit_map`'s warm-up), they stay in the
        posterior's mode. With a known noise the prior start keeps the particles' diversity of
        functions away from the data, which a start at one mode loses. The fit draws from the
        run's seed, so the start is a function of the model's weights and the seed."""
        start = self.start
        if start == "auto":
            start = auto_start(noise is not None)
        if start == "prior":
            return None, None
        if start == "laplace":
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                torch.manual_seed(seed)
                start = AutoDiagonalLaplace(self.model, progress=self.progress, noise="map").fit(x, y)
        return _start_gaussian(start, bridge.layout.dim, x), (_start_noise(start, x.shape[0]) if noise else None)

    def _noise_prior(self, like: torch.Tensor):
        """The prior of the noise column ``log sigma``: ``(log_prob, sample)``. A noise site has its
        own prior (through the log transform); a noise hyperparameter gets
        :math:`\\mathcal{N}(\\log\\sigma_0, 1)` around the likelihood's value at the start."""
        if self._run["noise"] == "site":
            bridge = self.bridge
            return bridge.noise_log_prior, lambda n: bridge.noise.fn.sample((n,)).reshape(n).log().to(like)
        loc = torch.tensor(self._run["noise_loc"], dtype=like.dtype, device=like.device)
        normal = torch.distributions.Normal(loc, torch.ones_like(loc))
        return normal.log_prob, lambda n: normal.sample((n,))

    def _run_chain(self, chain: int, x, y, current: Optional[dict], checkpoint_every: int) -> dict:
        """One SMC sampler from the prior or ``start`` (or from ``current``, a saved unfinished chain) to all
        data."""
        bridge, run = self.bridge, self._run
        part = distributed.shard(self.num_particles)
        # A learned noise scale is one more latent per particle, log sigma (see _noise_prior).
        learn_noise = run["noise"] is not None
        noise_log_prob, noise_sample = self._noise_prior(x) if learn_noise else (None, None)
        gen = torch.Generator(device=x.device).manual_seed(run["seed"] + chain)
        if current is None:
            perm = torch.randperm(x.shape[0], generator=gen, device=x.device)
        else:
            perm = current["perm"].to(x.device)
        xs, ys = x[perm], y[perm]
        bs = None if self.schedule == "full" else (self.batch_size or math.ceil(x.shape[0] / 10))
        path = DataPath(x.shape[0], bs, self.batch_growth)
        start = run.get("start")
        reference = None if start is None else _start_gaussian(DiagonalGaussian(start["mean"], start["var"]),
                                                               bridge.layout.dim, x)
        noise_start_log_prob, noise_start_sample = noise_log_prob, noise_sample
        if start is not None and start.get("log_noise") is not None:     # the start's noise, not its prior
            loc, var = (torch.tensor(v, dtype=x.dtype, device=x.device) for v in start["log_noise"])
            normal = torch.distributions.Normal(loc, var.sqrt())
            noise_start_log_prob, noise_start_sample = normal.log_prob, lambda n: normal.sample((n,))
        log_reference = None if reference is None else _reference_log_prob(reference, noise_start_log_prob)
        if learn_noise:
            target = AnnealedTarget(self._noise_log_prior(bridge, noise_log_prob), self._noise_log_lik(bridge, xs, ys),
                                    path, log_reference)
        else:
            log_lik = particle_log_lik(bridge)   # all particles at once, one GEMM per layer for MLPs
            target = AnnealedTarget(bridge.log_prior, lambda t, a, b: log_lik(t, xs[a:b], ys[a:b]), path,
                                    log_reference)
        if current is None:
            # The prior draws come from the chain's own seed too (a forked global stream: torch's
            # distributions take no generator), so a chain is a function of the seed alone.
            with torch.no_grad(), torch.random.fork_rng():
                torch.manual_seed(run["seed"] + chain)
                if reference is None:
                    particles = bridge.sample_prior(self.num_particles, dtype=x.dtype, device=x.device)
                else:
                    particles = reference.sample((self.num_particles,))
                if learn_noise:
                    particles = torch.cat([particles, noise_start_sample(self.num_particles)[:, None].to(particles)], -1)
            # Rank 0's prior draws for everyone; each rank keeps its share of the particles.
            theta0 = distributed.broadcast(particles.contiguous())
            state = annealed.init(theta0, self.step_size)
            state = state._replace(particles=state.particles[part])
            infos = []
        else:
            gen.set_state(current["generator"])
            state = annealed.SMCState(**{**current["state"], "particles": current["state"]["particles"].to(x)})
            infos = [annealed.SMCInfo(**i) for i in current["infos"]]
        desc = f"SMC {self.schedule}" + (f" chain {chain}" if self.num_chains > 1 else "")
        with tqdm(total=100, initial=100 * state.level / path.num_batches, desc=desc, leave=False,
                  disable=not self.progress or distributed.rank() != 0,
                  bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}{postfix}]") as bar:
            while state.level < path.num_batches:
                if len(infos) >= self.max_steps:
                    raise RuntimeError(f"AnnealedSMC: max_steps={self.max_steps} reached at level "
                                       f"{state.level:.3f}/{path.num_batches}; raise max_steps, num_particles "
                                       "or lower ess_threshold.")
                old = state.level
                state, info = annealed.step(gen, state, target, self._schedule_rule, self.kernel.move,
                                            self.ess_threshold, self.resampling)
                infos.append(info)
                run["current"] = {"chain": chain, "state": state._asdict(), "generator": gen.get_state(),
                                  "perm": perm, "infos": [i._asdict() for i in infos]}
                if len(infos) % checkpoint_every == 0:
                    self._save_checkpoint()
                bar.update(100 * (state.level - old) / path.num_batches)
                bar.set_postfix(data=info.num_data, ess=f"{info.ess:.0f}", acc=f"{info.acceptance_rate:.2f}")
        self._warn_unmixed(chain, infos)
        # Equal weights for the draws: resample if the last step did not.
        if float(annealed.log_ess(state.log_weights).exp()) < self.num_particles * (1 - 1e-6):
            theta, log_w, _ = annealed.resample(gen, state.particles, state.log_weights, self.resampling)
            state = state._replace(particles=theta, log_weights=log_w)
        state = state._replace(particles=distributed.all_gather_cat(state.particles))   # all P draws
        if not torch.isfinite(state.particles).all():
            raise FloatingPointError("AnnealedSMC produced non-finite particles; lower step_size.")
        return {"state": state._asdict(), "infos": [i._asdict() for i in infos]}

    def _warn_unmixed(self, chain: int, infos) -> None:
        """Warn when the moves did not decorrelate the particles in many steps (a chain whose
        particles are copies of a few ancestors looks confident and is not)."""
        move = self.kernel.move
        stuck = [i for i in infos if i.move_correlation > move.target_correlation]
        if infos and len(stuck) > 0.25 * len(infos):
            worst = max(i.move_correlation for i in stuck)
            warnings.warn(f"AnnealedSMC: in {len(stuck)} of {len(infos)} steps of chain {chain} the moves ended with "
                          f"the particles still correlated with where they started (log-density correlation up to "
                          f"{worst:.2f}, target {move.target_correlation}), so the particles have not mixed and "
                          f"the posterior is too narrow; raise max_mcmc_steps (now {move.max_mcmc_steps}), "
                          "num_leapfrog_steps (move='hmc') or the number of particles.", RuntimeWarning, stacklevel=3)

    def _finish(self, dtype) -> None:
        """Draws, evidence and noise from the finished chains of ``self._run``."""
        finished = self._run["finished"]
        states = [annealed.SMCState(**c["state"]) for c in finished]
        self._infos = [[annealed.SMCInfo(**i) for i in c["infos"]] for c in finished]
        theta = torch.stack([s.particles for s in states])          # (C, P, D) (+1: log sigma)
        layout = SiteLayout(self._run["layout"])
        self.noise_samples = None
        if self._run["noise"] is not None:
            self.noise_samples = theta[..., -1].exp().detach()        # (C, P)
            theta = theta[..., :-1]
            # The likelihood keeps the posterior root-mean-square noise (for log-likelihoods of
            # the draws, e.g. in ArviZ); the draws themselves are in noise_samples.
            self._set_noise(float(self.noise_samples.pow(2).mean().sqrt()))
            states = [s._replace(particles=s.particles[:, :-1]) for s in states]
        self._samples = {k: v.detach() for k, v in layout.unflatten(theta).items()}
        if self._run["noise"] == "site":     # a model's noise site is a posterior site like the weights
            self._samples[self._run["noise_site"]] = self.noise_samples
        self.log_evidence = torch.tensor([s.log_evidence for s in states], dtype=dtype)
        self._states = states

    # ----------------------------------------------------------------------------------------
    # persistence
    def state_dict(self) -> dict:
        """Everything a run produced or needs to continue: the finished chains (particles,
        weights, evidence, per-step diagnostics), an unfinished chain's state with its random
        stream, the seed and the noise prior. Plain tensors, numbers and dicts, for ``torch.save``.
        :meth:`load_state_dict` into an ``AnnealedSMC`` built the same way (on a fresh model too)
        gives the same draws; ``run(x, y, resume=True)`` then continues an unfinished run."""
        if self._run is None:
            raise RuntimeError("AnnealedSMC.state_dict(): call run(x, y) first.")
        return {"run": self._run, "num_particles": self.num_particles, "num_chains": self.num_chains}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (see there)."""
        if not isinstance(state, dict) or "run" not in state:
            raise ValueError("AnnealedSMC.load_state_dict: not an AnnealedSMC state (no 'run' entry).")
        for key, mine in (("num_particles", self.num_particles), ("num_chains", self.num_chains)):
            if state[key] != mine:
                raise ValueError(f"AnnealedSMC.load_state_dict: the saved run has {key}={state[key]}, this sampler "
                                 f"{mine}; build it with the same settings and model.")
        self._run = state["run"]
        if self._run["finished"]:
            ref = self._run["finished"][0]["state"]["particles"]
            if len(self._run["finished"]) == self.num_chains:
                self._finish(ref.dtype)

    def _save_checkpoint(self) -> None:
        path = getattr(self, "_checkpoint_path", None)
        if path is None:
            return
        if distributed.is_active():
            path = f"{path}.rank{distributed.rank()}"
        torch.save(self.state_dict(), path)

    def _set_noise(self, scale: float) -> None:
        """Put the posterior root-mean-square noise in the likelihood (the bridge's; the model's own
        for a noise hyperparameter, also when a run is loaded before the bridge exists)."""
        lik = self.bridge.likelihood if self.bridge is not None else getattr(self.model, "likelihood", None)
        if getattr(lik, "learn_noise", False):
            lik.set_noise_scale(scale)

    @staticmethod
    def _noise_log_prior(bridge, noise_log_prob):
        def log_prior(t):
            return bridge.log_prior(t[:, :-1]) + noise_log_prob(t[:, -1])
        return log_prior

    @staticmethod
    def _noise_log_lik(model, xs, ys):
        outputs = particle_outputs(model)

        def log_lik(t, a, b):
            f = outputs(t[:, :-1], xs[a:b])                                     # (P, n, O)
            scale = t[:, -1].exp().reshape(-1, *([1] * (f.dim() - 2)))           # (P, 1[, 1])
            if f.shape[-1] > 1:
                scale = scale[..., None]
            return model.likelihood.distribution(f, noise_scale=scale).log_prob(ys[a:b])
        return log_lik

    # ----------------------------------------------------------------------------------------
    def _check_run(self):
        if self._samples is None:
            raise RuntimeError("AnnealedSMC: call run(x, y) first.")

    def get_samples(self, num_samples: Optional[int] = None, group_by_chain: bool = False) -> Dict[str, torch.Tensor]:
        """Posterior draws per site: ``(num_chains, P, *shape)`` if ``group_by_chain`` else
        ``(num_chains * P, *shape)``; ``num_samples`` draws a random subset (as ``MCMC``)."""
        self._check_run()
        return draws.get_samples(self._samples, num_samples, group_by_chain)

    def particles(self) -> torch.Tensor:
        """The flat equally weighted particles, ``(num_chains, P, D)``."""
        self._check_run()
        return torch.stack([s.particles for s in self._states])

    def diagnostics(self) -> Dict[str, Dict[str, Union[list, float]]]:
        """Per chain (``"chain i"``): per-step ``ess``, ``acceptance_rate``, ``resampled``,
        ``num_data``, ``level``, ``step_size``; totals ``num_steps``, ``grad_evals``,
        ``data_grad_evals``, ``data_loglik_evals``, ``log_evidence``, ``final_ess`` (ESS of the
        last reweighting, in particles, before the final resampling); and ``divergences``
        (always empty: MH moves do not diverge, ArviZ reads the key)."""
        self._check_run()
        out: Dict[str, Dict] = {}
        for c, infos in enumerate(self._infos):
            key = f"chain {c}"
            out.setdefault("divergences", {})[key] = []
            for f in ("ess", "acceptance_rate", "resampled", "num_data", "level", "step_size", "num_mcmc_steps",
                      "move_correlation"):
                out.setdefault(f, {})[key] = [getattr(i, f) for i in infos]
            for f in ("grad_evals", "data_grad_evals", "data_loglik_evals"):
                out.setdefault(f, {})[key] = sum(getattr(i, f) for i in infos)
            out.setdefault("num_steps", {})[key] = len(infos)
            out.setdefault("log_evidence", {})[key] = float(self.log_evidence[c])
            out.setdefault("final_ess", {})[key] = float(infos[-1].ess)
        return out

    def summary(self, prob: float = 0.9, sites: Optional[List[str]] = None) -> None:
        """Print Pyro's MCMC summary table (mean, sd, quantiles, n_eff, r_hat over chains) for
        ``sites`` (default all) and the log-evidence per chain."""
        self._check_run()
        samples = self._samples if sites is None else {k: self._samples[k] for k in sites}
        print_summary(samples, prob=prob)
        le = ", ".join(f"{v:.3f}" for v in self.log_evidence.tolist())
        print(f"log evidence per chain: {le}")
