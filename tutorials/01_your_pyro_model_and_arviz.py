# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Your own Pyro model, every method, and the posterior in ArviZ
#
# pyro_subnet works on the Bayesian network you already write: a `PyroModule` whose weights are
# `PyroSample` sites with priors of your choosing, and whose likelihood is one observed site inside
# `pyro.plate("data", N)`. Nothing needs wrapping: the Laplace guides, the SG-MCMC kernels, SMC and
# the analytic predictive read the model through one bridge (`ps.nn.ModelBridge`), with the
# model's own priors and site names.
#
# Here: the regression BNN of Pyro's tutorials (per-layer prior scales and a latent noise scale)
# on 1-D data with a gap, fitted with Pyro's NUTS as the reference, then with a Laplace guide,
# SGHMC and the one-pass analytic predictive; read with ArviZ.

# %%
import os

import arviz as az
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, Predictive
from pyro.nn import PyroModule, PyroSample
from torch import nn

import pyro_subnet as ps

QUICK = os.environ.get("PYRO_SUBNET_QUICK") == "1"  # the test suite runs tutorials small
pyro.set_rng_seed(0)
ds = ps.data.gap_regression(n=40 if QUICK else 100)
in_gap = ds.x_test[:, 0].abs() < 1                 # the test grid's points between the two clusters


class BNN(PyroModule):
    def __init__(self, hidden=20):
        super().__init__()
        self.fc1 = PyroModule[nn.Linear](1, hidden)
        self.fc1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([hidden, 1]).to_event(2))
        self.fc1.bias = PyroSample(dist.Normal(0.0, 1.0).expand([hidden]).to_event(1))
        self.fc2 = PyroModule[nn.Linear](hidden, 1)
        self.fc2.weight = PyroSample(dist.Normal(0.0, hidden ** -0.5).expand([1, hidden]).to_event(2))
        self.fc2.bias = PyroSample(dist.Normal(0.0, 1.0).expand([1]).to_event(1))

    def forward(self, x, y=None):
        mu = self.fc2(torch.tanh(self.fc1(x))).squeeze(-1)
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mu, sigma), obs=y)
        return mu


model = BNN()
print(ps.nn.ModelBridge(model, ds.x_train))     # what the methods see: weight sites, noise site, likelihood

# %% [markdown]
# ## The reference: NUTS, exactly as for any Pyro model

# %%
nuts = MCMC(NUTS(model), num_samples=20 if QUICK else 300, warmup_steps=20 if QUICK else 300,
            disable_progbar=QUICK)
nuts.run(ds.x_train, ds.y_train)
mu = Predictive(model, posterior_samples=nuts.get_samples(), return_sites=["_RETURN"])(ds.x_test)["_RETURN"]
print(f"NUTS: noise {nuts.get_samples()['sigma'].mean():.3f}, predictive std in the gap "
      f"{mu.std(0)[in_gap].mean():.3f}")

# %% [markdown]
# ## A Laplace guide, SGHMC and the one-pass predictive on the same model
#
# `AutoSubnetLaplace` finds the MAP, the GGN and the prior precision (here tuned by the evidence,
# with the noise scale); `guide.median()` and `pyro.infer.Predictive` speak the model's own site
# names. SGHMC samples every site, `sigma` included, through its transform to the real line.

# %%
guide = ps.infer.AutoSubnetLaplace(model, subnet=ps.subnet.All(), prior_precision="marglik",
                                   map_steps=300 if QUICK else 2000, progress=False).fit(ds.x_train, ds.y_train)
print("Laplace guide sites:", sorted(guide.median()), f"noise {float(guide.median()['sigma']):.3f}")
mean, var = guide.predict(ds.x_test)                         # the linearised (GLM) predictive
print(f"Laplace: predictive std in the gap {var[in_gap].sqrt().mean():.3f}")

kernel = ps.infer.SGHMC(model, subsample_size=20)          # warm-up chooses the step size
# Pyro's initial_params are unconstrained values, one row per chain: start both chains at the MAP.
start = {**guide.median(), "sigma": guide.median()["sigma"].log()}
sghmc = MCMC(kernel, num_samples=20 if QUICK else 300, warmup_steps=20 if QUICK else 300, num_chains=2,
             initial_params={k: v.expand(2, *v.shape) for k, v in start.items()}, disable_progbar=QUICK)
sghmc.run(ds.x_train, ds.y_train)
print(f"SGHMC: noise {sghmc.get_samples()['sigma'].mean():.3f}")

analytic = ps.infer.AnalyticPredictive(model, guide)(ds.x_test)      # the forward is traced into layers
print(f"AnalyticPredictive: predictive std in the gap {analytic['var'][in_gap].sqrt().mean():.3f}")

# %% [markdown]
# ## ArviZ: convergence, LOO, calibration
#
# `arviz.from_pyro` works on the samplers as it does on NUTS (with the pointwise log-likelihood,
# even though `nn.Linear` takes no batched weights: the kernel hands ArviZ a batch-aware view of
# the model); `ps.to_inference_data` does the same for guides too.

# %%
idata = az.from_pyro(sghmc)
print(az.summary(idata, var_names=["sigma"]))
loo = az.loo(ps.to_inference_data(nuts))
print(loo)
ps.plots.predictive_band(ds.x_train, ds.y_train, ds.x_test, mean[:, 0], var[:, 0].sqrt(), title="AutoSubnetLaplace",
                         path="band_laplace.png")
assert torch.isfinite(torch.tensor(loo.elpd_loo))

# %% [markdown]
# ## A plain torch network: `ps.nn.BayesianNet`
#
# For a network written as a plain `nn.Module`, `BayesianNet` adds the priors (a Normal on every
# parameter, sites named after the parameters) and the likelihood. It is one convenient way to
# build such a model, batch-aware (`Predictive(parallel=True)` evaluates every draw in one
# `vmap`), and the methods treat it exactly like the model above.

# %%
net = nn.Sequential(nn.Linear(1, 20), nn.Tanh(), nn.Linear(20, 1))
wrapped = ps.nn.BayesianNet(net, likelihood="regression", prior_scale={"2.weight": 20 ** -0.5, "*": 1.0},
                            noise_scale=None)
print(wrapped.layout)
draws = Predictive(wrapped, num_samples=8, parallel=True)(ds.x_test)
print(draws["obs"].shape)
