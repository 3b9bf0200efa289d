# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Stochastic-gradient MCMC, and sampling while pruning
#
# NUTS needs the full-data gradient at every leapfrog step. For a network trained on many
# examples that is too slow, and stochastic-gradient Hamiltonian Monte Carlo (SGHMC; Chen, Fox &
# Guestrin, 2014) replaces it by a mini-batch estimate. With friction $\alpha$, step size
# $\epsilon$, a diagonal preconditioner $G$ and the mini-batch potential
# $\tilde U(\theta) = -\log p(\theta) - \frac{N}{B}\sum_{n \in \text{batch}} \log p(y_n \mid x_n, \theta)$,
#
# $$v \leftarrow (1-\alpha)\,v - \epsilon\, G\,\nabla\tilde U(\theta) + \sqrt{2\alpha\epsilon G}\,\xi,
# \qquad \theta \leftarrow \theta + v, \qquad \xi \sim \mathcal N(0, I).$$
#
# Ke & Fan (2022) show that their adaptive variational-Bayes update *is* this SGHMC with a
# particular $G$ (`preconditioner="vb"`). `ps.infer.SGHMC` is a `pyro.infer.MCMC` kernel, so the
# run, the draws and ArviZ work exactly as for NUTS.
#
# `ps.infer.SpikeSlabSGHMC` adds an EM loop over a spike-and-slab prior
# $w \mid \gamma \sim \gamma\,\mathcal N(0, \sigma_1^2) + (1-\gamma)\,\mathcal N(0, \sigma_0^2)$,
# $\gamma \sim \mathrm{Bernoulli}(\delta)$ (Deng et al., 2019): after each step the E-step computes
# the inclusion probability $\rho = P(\gamma = 1 \mid w)$,
#
# $$\operatorname{logit}\rho = \operatorname{logit}\delta + \tfrac12\log\tfrac{\sigma_0^2}{\sigma_1^2}
#   + \tfrac{w^2}{2}\Big(\tfrac{1}{\sigma_0^2} - \tfrac{1}{\sigma_1^2}\Big),$$
#
# which sets an adaptive weight decay $\kappa = \rho/\sigma_1^2 + (1-\rho)/\sigma_0^2$; during
# warm-up the smallest weights can be pruned to a target sparsity, after which they are exactly
# zero in every draw.

# %%
import os

import arviz as az
import pyro
import torch
from pyro.infer import MCMC
from torch import nn

import pyro_subnet as ps

QUICK = os.environ.get("PYRO_SUBNET_QUICK") == "1"  # the test suite runs tutorials small
if QUICK:
    torch.set_num_threads(1)  # tiny networks: thread start-up costs more than it saves
pyro.set_rng_seed(0)

# %% [markdown]
# ## SGHMC on 1D regression with a gap
#
# Inputs come from two clusters, $[-2,-1]$ and $[1,2]$; a good posterior is unsure in between.
# We start the chains from a short MAP fit (`ps.infer.map.fit_map`) and use mini-batches of 20.
#
# No step size is given: warm-up finds one. It is bounded by the stiffest direction of the
# posterior ($\epsilon \lambda_{\max}(G H) \le 1/4$, with $\lambda_{\max}$ from a few
# Hessian-vector products; with noise $\sigma = 0.1$ the output layer alone has curvature
# $\approx N \sum_j h_j^2 / \sigma^2 \approx 10^5$ here) and by the mini-batch gradient noise
# (a fifth of the injected noise), then frozen for the draws. A fixed step that is too large
# would be undone step after step and reported as divergences, with a warning.

# %%
ds = ps.data.gap_regression(n=60 if QUICK else 200, noise=0.1)
net = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1))
model = ps.nn.BayesianNet(net, likelihood="regression", noise_scale=0.1, prior_scale=1.0)
fit = ps.infer.map.fit_map(model, ds.x_train, ds.y_train, num_steps=300 if QUICK else 2000, lr=1e-2,
                           progress=False)
kernel = ps.infer.SGHMC(model, friction=0.5, subsample_size=20, steps_per_sample=10)
init = model.layout.unflatten(fit.theta.unsqueeze(0).repeat(2, 1))   # one start per chain
mcmc = MCMC(kernel, num_samples=50 if QUICK else 500, warmup_steps=50 if QUICK else 500, num_chains=2,
            initial_params=init, disable_progbar=QUICK)
mcmc.run(ds.x_train, ds.y_train)

# %% [markdown]
# The posterior predictive is the average over draws; its variance is the spread of the networks
# plus the noise $\sigma^2$. `model.network.flat_batched` evaluates every draw in one pass.

# %%
theta = model.layout.flatten(mcmc.get_samples())                 # (S, D)
with torch.no_grad():
    f = model.network.flat_batched(theta, ds.x_test)[..., 0]     # (S, N)
mean, std = f.mean(0), (f.var(0) + model.noise_scale ** 2).sqrt()
gap = ds.x_test[:, 0].abs() < 0.8
print(f"predictive std: in the data {std[~gap & (ds.x_test[:, 0].abs() < 2)].mean():.3f}, "
      f"in the gap {std[gap].mean():.3f}")
print(f"test RMSE {ps.metrics.rmse(mean, ds.y_test):.3f}")
ps.plots.predictive_band(ds.x_train, ds.y_train, ds.x_test, mean, std, truth=ds.y_test, title="SGHMC",
                         path="sghmc_band.png")

# %% [markdown]
# ## ArviZ reads the kernel's own statistics
#
# `ps.to_inference_data` adds SGHMC's per-draw `step_size` and the mini-batch `lp_minibatch`
# (from `mcmc.diagnostics()`, so it also works when chains ran in worker processes) next to the
# exact full-data `lp`, and the pointwise log-likelihood that `az.loo` needs. At small step
# sizes and short runs the chains have not mixed, and ArviZ says so: R-hat well above 1.01 and
# a bulk ESS of a few draws mean "run longer", not "trust the band".

# %%
idata = ps.to_inference_data(mcmc)
print(idata.sample_stats)
print(az.summary(idata, var_names=["2.bias"]))
print(az.loo(idata))

# %% [markdown]
# ## SpikeSlabSGHMC: which inputs matter?
#
# A linear model with 20 inputs of which only the first 3 drive the target. The spike
# ($\sigma_0 = 0.02$) holds weights that the data do not need; the inclusion probability
# separates the two groups, and pruning to 80% sparsity keeps the 3 true inputs (with a
# margin of 1 more).

# %%
torch.manual_seed(1)
x = torch.randn(200, 20)
y = x[:, :3] @ torch.tensor([2.0, -1.5, 1.0]) + 0.5 * torch.randn(200)
lin = ps.nn.BayesianNet(nn.Linear(20, 1), likelihood="regression", noise_scale=0.5)
spike = ps.infer.SpikeSlabSGHMC(lin, friction=0.5, spike_scale=0.02, target_sparsity=0.8)
mcmc_ss = MCMC(spike, num_samples=100 if QUICK else 500, warmup_steps=200 if QUICK else 1000, disable_progbar=QUICK)
mcmc_ss.run(x, y)
rho = spike.inclusion_probabilities()["weight"][0]
w = mcmc_ss.get_samples()["weight"][:, 0]
print("inclusion probabilities:", [round(float(r), 2) for r in rho[:6]], "...")
print("inputs kept (non-zero in every draw):", torch.nonzero((w != 0).all(0)).flatten().tolist())
print("posterior mean of the first 3 weights:", [round(float(v), 2) for v in w.mean(0)[:3]])
ps.plots.inclusion_histogram(spike.inclusion_probabilities(), path="inclusion.png")

# %%
idata_ss = ps.to_inference_data(mcmc_ss)
st = idata_ss.sample_stats
print(f"sparsity per draw: {float(st['sparsity'].min()):.2f}..{float(st['sparsity'].max()):.2f}, "
      f"inclusion rate {float(st['inclusion_rate'].mean()):.2f}")
assert bool((w[:, :3] != 0).all())
