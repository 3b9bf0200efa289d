"""The main job's methods: each fits one posterior on a data set and predicts the test split.

A method is a function ``run(ctx) -> MethodResult`` registered in :data:`METHODS` under the name
the ``--methods`` option uses. The :class:`Context` carries the data, the network, the MAP
weights (fitted once and shared, since every Laplace method starts from them) and the settings.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from . import metrics
from .data import Dataset
from .infer.map import fit_map
from .nn import BayesianNet


@dataclass
class MethodResult:
    """Test-set predictions of one method and what it cost."""

    name: str
    seconds: float
    probs: Optional[torch.Tensor] = None   # classification: (N, C)
    mean: Optional[torch.Tensor] = None    # regression: (N,)
    var: Optional[torch.Tensor] = None     # regression: predictive variance, noise included
    diagnostics: Dict[str, float] = field(default_factory=dict)  # printed and saved, e.g. ESS, R-hat
    plots: Dict[str, object] = field(default_factory=dict)       # data for figures, e.g. SMC traces

    def scores(self, ds: Dataset) -> Dict[str, float]:
        out = {"time_s": self.seconds}
        if ds.likelihood == "classification":
            out.update(accuracy=metrics.accuracy(self.probs, ds.y_test), nll=metrics.nll(self.probs, ds.y_test),
                       ece=metrics.ece(self.probs, ds.y_test), brier=metrics.brier(self.probs, ds.y_test))
        else:
            # Report in the original units of the target.
            mean = self.mean * ds.y_std + ds.y_mean
            var = self.var * ds.y_std ** 2
            y = ds.y_test * ds.y_std + ds.y_mean
            out.update(rmse=metrics.rmse(mean, y), nll=metrics.nll(mean, y, var=var))
        out.update(self.diagnostics)
        return out


def mlp(num_in: int, num_out: int, hidden=(100, 100), activation=nn.Tanh) -> nn.Sequential:
    """The multilayer perceptron the main job uses (tanh, as in the subnetwork-inference paper)."""
    layers, width = [], num_in
    for h in hidden:
        layers += [nn.Linear(width, h), activation()]
        width = h
    layers.append(nn.Linear(width, num_out))
    return nn.Sequential(*layers)


@dataclass
class Context:
    """What every method gets: data, model, MAP weights and settings.

    ``options`` overrides a method's settings by method name, e.g.
    ``{"sghmc": {"num_samples": 100}, "subnet_laplace": {"k": 200}}`` (the benchmarks use it);
    ``diagnostics=False`` skips the ArviZ diagnostics (they cost a pass over every draw).

    With a learned noise scale (``BayesianNet(noise_scale=None)``) the MAP fits it jointly with
    the weights and every method starts from that value (:meth:`reset_noise`), then refines it
    its own way (evidence, EM or a latent)."""

    ds: Dataset
    model: BayesianNet
    quick: bool = False
    seed: int = 0
    progress: bool = True
    map_steps: int = 2000
    map_lr: float = 3e-3
    map_batch_size: int = 128
    diagnostics: bool = True
    options: Dict[str, Dict[str, object]] = field(default_factory=dict)
    validation: Optional[Tuple[torch.Tensor, torch.Tensor]] = None   # held out of ds.x_train, for tuning
    _map: Optional[torch.Tensor] = None
    _map_seconds: float = 0.0
    _map_noise: Optional[float] = None

    def option(self, method: str, key: str, default):
        """Setting ``key`` of ``method``: ``options[method][key]`` if given, else ``default``."""
        return self.options.get(method, {}).get(key, default)

    @property
    def learns_noise(self) -> bool:
        return bool(getattr(self.model.likelihood, "learn_noise", False))

    def reset_noise(self) -> None:
        """Put a learned noise scale back to the MAP's value (methods change it in place)."""
        if self.learns_noise and self._map_noise is not None:
            self.model.likelihood.set_noise_scale(self._map_noise)

    @property
    def theta_map(self) -> torch.Tensor:
        """MAP weights, fitted on first use and shared by the methods that start from them (a
        learned noise scale is put back to the MAP's value: the method starts from there)."""
        self._fit_map()
        self.reset_noise()
        return self._map

    def _fit_map(self) -> None:
        if self._map is None:
            t0 = time.perf_counter()
            torch.manual_seed(self.seed)
            self._map = fit_map(self.model, self.ds.x_train, self.ds.y_train, num_steps=self.map_steps,
                                lr=self.map_lr, batch_size=self.map_batch_size, progress=self.progress,
                                seed=self.seed).theta
            self._map_seconds = time.perf_counter() - t0
            if self.learns_noise:
                self._map_noise = self.model.noise_scale

    @property
    def map_seconds(self) -> float:
        self._fit_map()
        return self._map_seconds


def make_context(ds: Dataset, quick: bool = False, seed: int = 0, progress: bool = True,
                 validation_fraction: float = 0.1, hidden=None) -> Context:
    """The main job's setting: an MLP (one hidden layer of 50 tanh units with ``quick``, else
    two of 100), a Normal(0, 1) prior, and ``validation_fraction`` of the training split held out
    (the methods fit on the rest; the ones that tune a setting on held-out data use it)."""
    torch.manual_seed(seed)
    validation = None
    if validation_fraction > 0:
        n = ds.x_train.shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_val = max(1, int(round(validation_fraction * n)))
        val, fit = perm[:n_val], perm[n_val:]
        validation = (ds.x_train[val], ds.y_train[val])
        ds = dataclasses.replace(ds, x_train=ds.x_train[fit], y_train=ds.y_train[fit])
    hidden = hidden or ((50,) if quick else (100, 100))
    net = mlp(ds.num_features, ds.num_outputs, hidden)
    noise = 0.5 if ds.likelihood == "regression" else 0.1
    model = BayesianNet(net, likelihood=ds.likelihood, prior_scale=1.0, noise_scale=noise)
    return Context(ds, model, quick=quick, seed=seed, progress=progress, map_steps=600 if quick else 2000,
                   validation=validation)


def run_map(ctx: Context) -> MethodResult:
    """The MAP network alone: no uncertainty over the weights."""
    theta = ctx.theta_map
    t0 = time.perf_counter()
    with torch.no_grad():
        f = ctx.model.network.flat(theta, ctx.ds.x_test)
    predict_s = time.perf_counter() - t0
    seconds = ctx.map_seconds + predict_s
    if ctx.ds.likelihood == "classification":
        return MethodResult("MAP", seconds, probs=torch.softmax(f, -1))
    # The noise scale at the MAP: the jointly fitted one if learned, else the training residual
    # standard deviation.
    with torch.no_grad():
        resid = ctx.model.network.flat(theta, ctx.ds.x_train)[:, 0] - ctx.ds.y_train
    noise_var = ctx.model.noise_scale ** 2 if ctx.learns_noise else resid.pow(2).mean()
    var = torch.as_tensor(noise_var, dtype=f.dtype).expand(len(f))
    return MethodResult("MAP", seconds, mean=f[:, 0], var=var)


def arviz_diagnostics(obj) -> Dict[str, float]:
    """ArviZ's view of a sampler's draws (min bulk ESS, max R-hat with several chains, elpd_loo,
    share of Pareto k > 0.7), from :func:`~pyro_subnet.to_inference_data` on the training data."""
    from .diagnostics.arviz_io import summary_numbers
    from .diagnostics import to_inference_data
    return summary_numbers(to_inference_data(obj))


def run_annealed_smc(ctx: Context) -> MethodResult:
    """Data-annealed SMC (adaptive schedule over stages that double the data, MALA moves) from
    the prior; no MAP needed."""
    from .infer.smc import AnnealedSMC
    ctx.reset_noise()
    torch.manual_seed(ctx.seed)
    opt = lambda k, d: ctx.option("annealed_smc", k, d)  # noqa: E731
    smc = AnnealedSMC(ctx.model, num_particles=opt("num_particles", 32 if ctx.quick else 64),
                      batch_size=opt("batch_size", 64), schedule="adaptive", move="mala",
                      num_mcmc_steps=opt("num_mcmc_steps", 5), batch_growth=opt("batch_growth", 2.0),
                      seed=ctx.seed, progress=ctx.progress)
    t0 = time.perf_counter()
    smc.run(ctx.ds.x_train, ctx.ds.y_train)
    theta = smc.particles()[0]
    with torch.no_grad():
        f = ctx.model.network.flat_batched(theta, ctx.ds.x_test)          # (P, N, O)
    seconds = time.perf_counter() - t0
    d = smc.diagnostics()
    diag = {"log_evidence": float(smc.log_evidence[0]), "smc_steps": d["num_steps"]["chain 0"],
            "grad_passes": d["grad_evals"]["chain 0"], **(arviz_diagnostics(smc) if ctx.diagnostics else {})}
    plots = {"smc": {k: d[k]["chain 0"] for k in ("ess", "acceptance_rate", "num_data", "step_size", "resampled")}}
    if ctx.ds.likelihood == "classification":
        return MethodResult("AnnealedSMC", seconds, probs=torch.softmax(f, -1).mean(0), diagnostics=diag,
                            plots=plots)
    mean = f[..., 0]
    # A learned noise is a latent per particle: the mixture's variance has its mean square.
    noise_var = smc.noise_samples[0].pow(2).mean() if smc.noise_samples is not None else ctx.model.noise_scale ** 2
    if smc.noise_samples is not None:
        diag["noise_scale"] = float(noise_var.sqrt())
    return MethodResult("AnnealedSMC", seconds, mean=mean.mean(0),
                        var=mean.var(0) + noise_var, diagnostics=diag, plots=plots)


def sgmcmc_posterior(ctx: Context, target_sparsity: Optional[float] = None, num_samples: Optional[int] = None,
                     warmup_steps: Optional[int] = None, steps_per_sample: int = 10, batch_size: int = 128,
                     epoch_lr: float = 0.05):
    """Run SGHMC (``target_sparsity=None``) or SpikeSlabSGHMC from the shared MAP through
    ``pyro.infer.MCMC``; returns ``(mcmc, kernel, seconds)``. The step size is ``epoch_lr / N``
    (a per-example learning rate on the full-data potential; times the MAP's sigma^2 for a learned
    noise scale, since the curvature grows as 1 / sigma^2); the preconditioner is "vb"."""
    import pyro
    from pyro.infer import MCMC

    from .infer.mcmc import SGHMC, SpikeSlabSGHMC
    ds, model = ctx.ds, ctx.model
    n = ds.x_train.shape[0]
    name = "sghmc" if target_sparsity is None else "spike_slab_sghmc"
    num_samples = num_samples or ctx.option(name, "num_samples", 50 if ctx.quick else 200)
    warmup_steps = warmup_steps or ctx.option(name, "warmup_steps", 50 if ctx.quick else 300)
    steps_per_sample = ctx.option(name, "steps_per_sample", steps_per_sample)
    epoch_lr = ctx.option(name, "epoch_lr", epoch_lr)
    batch_size = ctx.option(name, "batch_size", batch_size)
    theta0 = ctx.theta_map
    # The potential's curvature scales as 1 / sigma^2: a learned noise scales the step with sigma^2.
    step = epoch_lr / n * (model.noise_scale ** 2 if ctx.learns_noise else 1.0)
    options = dict(step_size=step, friction=0.1, preconditioner="vb", subsample_size=batch_size,
                   steps_per_sample=steps_per_sample)
    if target_sparsity is None:
        kernel = SGHMC(model, **options)
    else:
        kernel = SpikeSlabSGHMC(model, spike_scale=0.3, slab_scale=1.0, inclusion_prior=0.5,
                                target_sparsity=target_sparsity, **options)
    pyro.set_rng_seed(ctx.seed)
    init = model.layout.unflatten(theta0)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps, initial_params=init,
                disable_progbar=not ctx.progress)
    t0 = time.perf_counter()
    mcmc.run(ds.x_train, ds.y_train)
    return mcmc, kernel, time.perf_counter() - t0


def _sgmcmc_result(name: str, ctx: Context, mcmc, seconds: float, extra: Dict[str, float]) -> MethodResult:
    model, ds = ctx.model, ctx.ds
    theta = model.layout.flatten(mcmc.get_samples())          # (S, D)
    t0 = time.perf_counter()
    with torch.no_grad():
        f = model.network.flat_batched(theta, ds.x_test)      # (S, N, O)
    seconds += ctx.map_seconds + time.perf_counter() - t0
    if ds.likelihood == "classification":
        return MethodResult(name, seconds, probs=torch.softmax(f, -1).mean(0), diagnostics=extra)
    noise = model.noise_scale ** 2   # learned: the EM value at the end of warm-up
    if ctx.learns_noise:
        extra = {**extra, "noise_scale": model.noise_scale}
    return MethodResult(name, seconds, mean=f[..., 0].mean(0), var=f[..., 0].var(0) + noise, diagnostics=extra)


def run_sghmc(ctx: Context) -> MethodResult:
    """SGHMC (preconditioned, Ke & Fan 2022) from the MAP; Bayesian model average of the draws."""
    mcmc, kernel, seconds = sgmcmc_posterior(ctx)
    return _sgmcmc_result("SGHMC", ctx, mcmc, seconds, arviz_diagnostics(mcmc) if ctx.diagnostics else {})


def run_spike_slab_sghmc(ctx: Context) -> MethodResult:
    """SpikeSlabSGHMC pruned to 90% sparsity of the weight matrices (Deng et al. 2019; Ke & Fan 2022)."""
    mcmc, kernel, seconds = sgmcmc_posterior(ctx, target_sparsity=ctx.option("spike_slab_sghmc", "target_sparsity", 0.9))
    sparsity = mcmc.diagnostics()["sparsity"]["chain 0"][-1]
    extra = {"sparsity": sparsity, **(arviz_diagnostics(mcmc) if ctx.diagnostics else {})}
    result = _sgmcmc_result("SpikeSlabSGHMC", ctx, mcmc, seconds, extra)
    result.plots["inclusion"] = kernel.inclusion_probabilities()
    return result


def _tune_on_validation(ctx: Context, theta: torch.Tensor, ggn_diag: torch.Tensor, grid=None) -> torch.Tensor:
    """The prior precision (one scalar, from ``grid``) of a diagonal Laplace whose analytic
    predictive has the lowest NLL on ``ctx.validation``."""
    from .infer.analytic import AnalyticPredictive, FlatPosterior

    x_val, y_val = ctx.validation
    grid = torch.logspace(-2, 4, 25).tolist() if grid is None else grid
    best, best_nll = None, float("inf")
    for a in grid:
        out = AnalyticPredictive(ctx.model, FlatPosterior(theta, 1.0 / (ggn_diag + a)), covariance="diag",
                                 activations="linearise")(x_val)
        nll = metrics.nll(out["probs"], y_val) if "probs" in out else metrics.nll(out["mean"], y_val, var=out["var"])
        if nll < best_nll:
            best, best_nll = a, nll
    return torch.full_like(theta, best)


def run_analytic(ctx: Context) -> MethodResult:
    """MAP + diagonal (GGN) Laplace, predicted in one pass by
    :class:`~pyro_subnet.infer.AnalyticPredictive`; its prior precision is tuned on the held-out
    split (or, without one, by the diagonal evidence; a learned noise always by the evidence)."""
    from .infer.analytic import AnalyticPredictive, FlatPosterior
    from .infer.autoguide import curvature

    theta = ctx.theta_map
    t0 = time.perf_counter()
    lik = ctx.model.likelihood
    ggn = curvature.ggn(ctx.model.network, lik, theta, (ctx.ds.x_train, ctx.ds.y_train), structure="diag")
    prior = ctx.model.prior_precision(dtype=theta.dtype, device=theta.device)
    from .infer.autoguide import prior as prior_lib
    one_group = torch.zeros(len(theta), dtype=torch.long, device=theta.device)
    if ctx.learns_noise:
        # Noise scale and one prior precision by the diagonal Laplace evidence.
        sse = prior_lib.residual_sum_of_squares(ctx.model.network, theta, (ctx.ds.x_train, ctx.ds.y_train))
        ggn1 = ggn * lik.noise_scale ** 2
        prior, scale = prior_lib.tune_marglik_noise(ggn1, theta, one_group, prior, sse, len(ctx.ds.y_train),
                                                    lik.noise_scale)
        lik.set_noise_scale(scale)
        ggn = ggn1 / scale ** 2
    elif ctx.validation is not None:
        # One prior precision by the held-out NLL: a diagonal Laplace over every weight with its
        # evidence-tuned precision is far too wide (the diagonal drops the correlations that
        # cancel in function space). One analytic pass per grid value makes the search cheap.
        prior = _tune_on_validation(ctx, theta, ggn)
    else:
        prior = prior_lib.tune_marglik(ggn, theta, one_group, prior)
    diag = {"prior_precision": float(prior[0]), **({"noise_scale": lik.noise_scale} if ctx.learns_noise else {})}
    # A Laplace posterior belongs to the network linearised at the MAP: activations linearised
    # at the mean give exactly that model's predictive (moment matching would instead push the
    # Gaussian through the nonlinear network, whose mean drifts away from the MAP's).
    out = AnalyticPredictive(ctx.model, FlatPosterior(theta, 1.0 / (ggn + prior)), covariance="diag",
                             activations="linearise")(ctx.ds.x_test)
    seconds = ctx.map_seconds + time.perf_counter() - t0
    if ctx.ds.likelihood == "classification":
        return MethodResult("AnalyticPredictive", seconds, probs=out["probs"], diagnostics=diag)
    return MethodResult("AnalyticPredictive", seconds, mean=out["mean"], var=out["var"], diagnostics=diag)


def _guide_result(name: str, ctx: Context, pred, seconds: float, diag: Dict[str, float]) -> MethodResult:
    """A Laplace guide's ``predict`` output (probabilities, or ``(mean, var)`` of shape ``(N, 1)``)
    as a :class:`MethodResult`, with a learned noise scale among the diagnostics."""
    if ctx.learns_noise:
        diag = {**diag, "noise_scale": ctx.model.noise_scale}
    if ctx.ds.likelihood == "classification":
        return MethodResult(name, seconds, probs=pred, diagnostics=diag)
    mean, var = pred
    return MethodResult(name, seconds, mean=mean[:, 0], var=var[:, 0], diagnostics=diag)


def run_subnet_laplace(ctx: Context) -> MethodResult:
    """AutoSubnetLaplace: full-covariance linearised Laplace over a greedy predictive-variance
    subnetwork of up to 1000 weights, the rest at the shared MAP; GLM predictive (probit)."""
    from .infer import AutoSubnetLaplace
    from .subnet import PredictiveVariance

    theta = ctx.theta_map
    ds = ctx.ds
    t0 = time.perf_counter()
    k = min(ctx.option("subnet_laplace", "k", min(1000, ctx.model.layout.dim // 2)), ctx.model.layout.dim)
    guide = AutoSubnetLaplace(ctx.model, subnet=PredictiveVariance(k), prior_precision="marglik",
                              progress=ctx.progress).fit(ds.x_train, ds.y_train, map_theta=theta)
    pred = guide.predict(ds.x_test)
    seconds = ctx.map_seconds + time.perf_counter() - t0
    diag = {"k": float(k), "log_evidence": float(guide.log_marginal_likelihood()),
            "prior_precision": float(guide.prior_prec.mean())}
    return _guide_result("AutoSubnetLaplace", ctx, pred, seconds, diag)


def run_sampled_laplace(ctx: Context) -> MethodResult:
    """AutoSampledLaplace: linearised Laplace over all weights by sample-then-optimise (batched
    CG), prior precision (and a learned noise) by EM; GLM predictive."""
    from .infer import AutoSampledLaplace

    theta = ctx.theta_map
    ds = ctx.ds
    opt = lambda k, d: ctx.option("sampled_laplace", k, d)  # noqa: E731
    t0 = time.perf_counter()
    guide = AutoSampledLaplace(ctx.model, num_posterior_samples=opt("num_posterior_samples", 16 if ctx.quick else 32),
                               prior_precision="em", num_em_steps=opt("num_em_steps", 3 if ctx.quick else 5), em_tol=1e-2,
                               tol=opt("tol", 1e-3), max_iter=opt("max_iter", 100 if ctx.quick else 200),
                               seed=ctx.seed, progress=ctx.progress).fit(ds.x_train, ds.y_train, map_theta=theta)
    pred = guide.predict(ds.x_test)
    seconds = ctx.map_seconds + time.perf_counter() - t0
    diag = {"k": float(len(guide.subnet_indices)), "prior_precision": float(guide.prior_prec.mean()),
            "effective_dim": guide.effective_dimension(), "em_steps": float(len(guide.em_trace)),
            "cg_residual": float(guide.em_trace[-1, 3])}
    return _guide_result("AutoSampledLaplace", ctx, pred, seconds, diag)


METHODS: Dict[str, Callable[[Context], MethodResult]] = {
    "map": run_map,
    "subnet_laplace": run_subnet_laplace,
    "sampled_laplace": run_sampled_laplace,
    "sghmc": run_sghmc,
    "spike_slab_sghmc": run_spike_slab_sghmc,
    "annealed_smc": run_annealed_smc,
    "analytic": run_analytic,
}
