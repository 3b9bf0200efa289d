# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Sequential Monte Carlo with data annealing
#
# An SMC sampler moves a population of $P$ weighted particles through a sequence of targets
# from the prior to the posterior. `ps.infer.AnnealedSMC` (Millard, Murphy, Green & Maskell,
# 2026) brings the *data* in gradually: over a random order of the data split into batches
# $D_1, D_2, \dots$, the targets are
#
# $$\pi_t(\theta) \propto p(\theta)\prod_{b < B_t} p(D_b \mid \theta)\; p(D_{B_t} \mid \theta)^{\phi_t}.$$
#
# Each step (1) reweights the particles by the likelihood of the newly included data,
# $\log w^i \mathrel{+}= \Delta\log p(\cdot \mid \theta^i)$, choosing how much data so that the
# effective sample size $\mathrm{ESS} = 1/\sum_i (W^i)^2$ stays near half of $P$; (2) resamples;
# (3) moves every particle with a few MALA steps that target $\pi_t$ using only the data included so
# far, which is what makes early steps cheap. The mean incremental weights multiply to an unbiased
# estimate of the evidence $p(D)$.

# %%
import os

import arviz as az
import pyro
import torch
from torch import nn

import pyro_subnet as ps

QUICK = os.environ.get("PYRO_SUBNET_QUICK") == "1"  # the test suite runs tutorials small
if QUICK:
    torch.set_num_threads(1)  # tiny networks: thread start-up costs more than it saves
pyro.set_rng_seed(0)
ds = ps.data.two_moons(n=80 if QUICK else 400)
net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
model = ps.nn.BayesianNet(net, likelihood="classification", prior_scale=1.0)

# %% [markdown]
# ## Run: two independent chains, so that R-hat is defined

# %%
smc = ps.infer.AnnealedSMC(model, num_particles=64 if QUICK else 256, batch_size=16, schedule="adaptive",
                           move="mala", num_chains=2, seed=0, progress=not QUICK)
smc.run(ds.x_train, ds.y_train)
d = smc.diagnostics()
for c in ("chain 0", "chain 1"):
    print(f"{c}: {d['num_steps'][c]} steps, {d['grad_evals'][c]} gradient passes, "
          f"log evidence {d['log_evidence'][c]:.2f}, final ESS {d['final_ess'][c]:.1f}")

# %% [markdown]
# The per-step record shows the schedule at work: ESS falls as data come in, the sampler
# resamples (x), and the move's step size adapts to the acceptance rate.

# %%
ps.plots.smc_traces(d, path="smc_traces.png")

# %% [markdown]
# ## Predictions and ArviZ
#
# The particles are equally weighted draws; `ps.to_inference_data` stores the per-chain log
# evidence and final ESS in `sample_stats`, and the per-step series in a `step_stats` group.

# %%
theta = smc.particles().reshape(-1, model.layout.dim)
with torch.no_grad():
    probs = model.network.flat_batched(theta, ds.x_test).softmax(-1).mean(0)
print(f"accuracy {ps.metrics.accuracy(probs, ds.y_test):.3f}, NLL {ps.metrics.nll(probs, ds.y_test):.3f}, "
      f"ECE {ps.metrics.ece(probs, ds.y_test):.3f}")
idata = ps.to_inference_data(smc)
print(idata.step_stats)
print(az.summary(idata, var_names=["2.bias"]))
loo = az.loo(idata)
print(f"elpd_loo {loo.elpd_loo:.2f} (log evidence {smc.log_evidence.mean():.2f}: LOO scores prediction, "
      "the evidence the whole data given the prior)")
ps.plots.reliability_diagram({"AnnealedSMC": probs}, ds.y_test, path="reliability_smc.png")
