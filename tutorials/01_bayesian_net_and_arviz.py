# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # A plain torch network as a Pyro model, and its posterior in ArviZ
#
# `ps.nn.BayesianNet` turns any torch module into a Pyro model: a Normal prior on every
# parameter (sites named after the parameters) and an observed site `"obs"` inside
# `pyro.plate("data", N)`. It is *batch-aware*: when the weight sites carry sample dimensions,
# every draw is evaluated in one `torch.func.vmap` pass, so `Predictive(parallel=True)` and
# ArviZ's pointwise log-likelihood just work.
#
# Here we fit a tiny classifier on two moons with Pyro's own NUTS, then read the posterior with
# ArviZ through `ps.to_inference_data`.

# %%
import os

import arviz as az
import pyro
import torch
from pyro.infer import MCMC, NUTS, Predictive
from torch import nn

import pyro_subnet as ps

QUICK = os.environ.get("PYRO_SUBNET_QUICK") == "1"  # the test suite runs tutorials small
pyro.set_rng_seed(0)
ds = ps.data.two_moons(n=40 if QUICK else 200)
net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
model = ps.nn.BayesianNet(net, likelihood="classification", prior_scale=1.0)
print(model.layout)

# %% [markdown]
# ## NUTS, exactly as for any Pyro model

# %%
mcmc = MCMC(NUTS(model), num_samples=10 if QUICK else 200, warmup_steps=10 if QUICK else 200,
            num_chains=2, disable_progbar=QUICK)
mcmc.run(ds.x_train, ds.y_train)

# %% [markdown]
# ## Posterior predictive in one vectorised pass
#
# `parallel=True` hands the model weights of shape `(S, 1, *shape)`; BayesianNet evaluates all
# `S` networks at once and returns logits of shape `(S, N, C)`.

# %%
samples = mcmc.get_samples()
pred = Predictive(model, posterior_samples=samples, return_sites=["_RETURN"], parallel=True)(ds.x_test)
probs = pred["_RETURN"].softmax(-1).mean(0)
print(f"accuracy {ps.metrics.accuracy(probs, ds.y_test):.3f}, NLL {ps.metrics.nll(probs, ds.y_test):.3f}, "
      f"ECE {ps.metrics.ece(probs, ds.y_test):.3f}")

# %% [markdown]
# ## ArviZ: convergence, LOO, calibration
#
# `ps.to_inference_data` fills `posterior`, `sample_stats`, `log_likelihood` (so `az.loo` needs no
# arguments), `posterior_predictive` and `observed_data`.

# %%
idata = ps.to_inference_data(mcmc)
print(az.summary(idata, var_names=["2.bias"]))
loo = az.loo(idata)
print(loo)
ps.plots.reliability_diagram({"NUTS": probs}, ds.y_test, path="reliability_nuts.png")
assert torch.isfinite(torch.tensor(loo.elpd_loo))
