# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # The posterior predictive in one forward pass
#
# `pyro.infer.Predictive` averages $S$ forward passes over weight draws: its cost grows with $S$
# and its answer carries Monte Carlo noise of order $1/\sqrt S$. `ps.infer.AnalyticPredictive`
# (Li, Klasson, Solin & Trapp, *Streamlining Prediction in Bayesian Deep Learning*, ICLR 2025)
# carries the mean and (co)variance of every activation through the network once instead:
#
# * a linear layer $h' = W h + b$ with independent Gaussian weights maps moments exactly,
#   $\mathbb E[h'] = \mathbb E[W]\mathbb E[h] + \mathbb E[b]$ and
#   $\mathrm{Var}[h'_i] = \sum_j \big(\mathbb E[W_{ij}]^2 \mathrm{Var}[h_j] + \mathrm{Var}[W_{ij}]
#   (\mathbb E[h_j]^2 + \mathrm{Var}[h_j])\big) + \mathrm{Var}[b_i]$;
# * each activation's output mean and variance are matched to its Gaussian input: closed form for
#   ReLU (a rectified Gaussian), a probit fit with a quadrature correction for tanh and sigmoid
#   (`activations="linearise"` linearises at the mean instead, as the paper does);
# * at the output, $f \sim N(\mu, \Sigma)$ gives $N(\mu, \Sigma + \sigma^2 I)$ for regression and,
#   for classification $\mathbb E[\mathrm{softmax}(f)]$: as the probability that each class's logit
#   is the largest (Clark's moment-matched maximum, `link="gumbel_max"`, the default), or by a fixed
#   quasi-Monte Carlo rule over the logits alone (`link="sobol"`); the
#   paper's probit link $\mathrm{softmax}(\mu/\sqrt{1 + \pi v / 8})$ is `link="probit"`;
# * between the units of one example the covariance is kept where it changes the predictive
#   (`covariance="auto"`), carried as an unformed factor so that it costs little more than the
#   variances alone.
#
# It reads any Gaussian guide: `AutoNormal`, `AutoDiagonalNormal`, `AutoMultivariateNormal`,
# `AutoLowRankMultivariateNormal`, our Laplace guides, or a `FlatPosterior(mean, var)`.

# %%
import os
import time

import pyro
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

import pyro_subnet as ps

QUICK = os.environ.get("PYRO_SUBNET_QUICK") == "1"  # the test suite runs tutorials small
if QUICK:
    torch.set_num_threads(1)
pyro.set_rng_seed(0)

# %% [markdown]
# ## Exact for a linear network
#
# With no nonlinearity the predictive of a Gaussian posterior is Gaussian, and moment propagation
# gives it exactly: mean $X\mu_w + \mu_b$, variance $\sum_j x_j^2 v_{w,j} + v_b + \sigma^2$.

# %%
x = torch.randn(50, 3, dtype=torch.float64)
lin = ps.nn.BayesianNet(nn.Linear(3, 1).double(), likelihood="regression", noise_scale=0.3)
mean_w = torch.randn(4, dtype=torch.float64)
var_w = torch.rand(4, dtype=torch.float64)
out = ps.infer.AnalyticPredictive(lin, ps.infer.analytic.FlatPosterior(mean_w, var_w))(x)
exact_mean = x @ mean_w[:3] + mean_w[3]
exact_var = x.pow(2) @ var_w[:3] + var_w[3] + 0.3 ** 2
print(f"max error: mean {float((out['mean'] - exact_mean).abs().max()):.1e}, "
      f"variance {float((out['var'] - exact_var).abs().max()):.1e}")
assert torch.allclose(out["mean"], exact_mean) and torch.allclose(out["var"], exact_var)

# %% [markdown]
# ## A classifier trained by SVI
#
# A mean-field `AutoNormal` posterior over a digits MLP, fitted by Pyro's SVI. The analytic
# predictive is one call with the same signature as `Predictive`; we compare it with Monte Carlo
# at 100 and 1000 draws, in time and in test NLL.

# %%
ds = ps.data.load_digits()
net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
model = ps.nn.BayesianNet(net, likelihood="classification", prior_scale=1.0)
guide = AutoNormal(model, init_scale=1e-2)
svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
for step in range(300 if QUICK else 3000):
    loss = svi.step(ds.x_train, ds.y_train)
print(f"final ELBO loss {loss:.1f}")

# %%
analytic = ps.infer.AnalyticPredictive(model, guide)
t0 = time.perf_counter()
probs = analytic(ds.x_test)["probs"]
t_analytic = time.perf_counter() - t0
assert torch.allclose(probs.sum(-1), torch.ones(len(probs)), atol=1e-5)

rows = {"analytic": (probs, t_analytic)}
for S in (100, 1000):
    t0 = time.perf_counter()
    logits = Predictive(model, guide=guide, num_samples=S, parallel=True, return_sites=["_RETURN"])(ds.x_test)
    rows[f"MC {S}"] = (torch.softmax(logits["_RETURN"], -1).mean(0), time.perf_counter() - t0)
for name, (p, secs) in rows.items():
    print(f"{name:9s} NLL {ps.metrics.nll(p, ds.y_test):.4f}  ECE {ps.metrics.ece(p, ds.y_test):.4f}  "
          f"time {secs * 1e3:7.1f} ms ({rows['MC 100'][1] / secs:5.1f}x MC-100)")
gap = abs(ps.metrics.nll(probs, ds.y_test) / ps.metrics.nll(rows["MC 1000"][0], ds.y_test) - 1)
print(f"analytic NLL within {gap:.1%} of 1000-sample Monte Carlo")
assert gap < 0.05   # the full comparison: benchmarks/analytic_predictive.py
ps.plots.reliability_diagram({k: v[0] for k, v in rows.items()}, ds.y_test, path="analytic_reliability.png")

# %% [markdown]
# ## Regression: which Gaussian, and which network
#
# Any Gaussian over the flat weights works. A diagonal GGN Laplace around the MAP of a
# gap-regression network (`ps.infer.AutoDiagonalLaplace`, read through its `flat_posterior()`)
# is *not* wider in the gap between the two clusters of data than inside them: the known failure
# of factorised posteriors at "in-between" uncertainty (Foong et al., 2019).
#
# The subnetwork Laplace guide keeps a full covariance over 30 weights, which `AnalyticPredictive`
# reads (`flat_gaussian()`). It then matters which network the Gaussian is pushed through:
#
# * `activations="moments"` matches each activation's mean and variance under its
#   Gaussian input: it approximates sampling the *network itself* (`guide.predict(method="nn")`).
#   Where the subnetwork's correlated weights meet activations that carry the same correlations
#   (a subnetwork over two layers), it also keeps the covariance of their products (`products`;
#   on a digits MLP with 300 such weights they are 15% of the output variance);
# * `activations="linearise"` linearises each activation at the mean: for a Laplace posterior
#   that is exactly the *linearised* network of the GLM predictive (`guide.predict()`), the one
#   the Laplace approximation was built for, and the one whose band grows in the gap. It is what
#   the default, `activations="auto"`, takes for a Laplace guide (whose `Predictive` draws the
#   GLM predictive); any other Gaussian gets `"moments"`.

# %%
reg = ps.data.gap_regression(n=60 if QUICK else 200, noise=0.1)
rnet = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1))
rmodel = ps.nn.BayesianNet(rnet, likelihood="regression", noise_scale=0.1)
theta = ps.infer.fit_map(rmodel, reg.x_train, reg.y_train, num_steps=500 if QUICK else 3000, lr=1e-2,
                         batch_size=None, progress=False).theta
diagonal = ps.infer.AutoDiagonalLaplace(rmodel, progress=False)      # the model's own prior
diagonal.fit(reg.x_train, reg.y_train, map_theta=theta)
subnet = ps.infer.AutoSubnetLaplace(rmodel, subnet=ps.subnet.LargestVariance(30, method="diag_laplace"),
                                    prior_precision="marglik", progress=False)
subnet.fit(reg.x_train, reg.y_train, map_theta=theta)
gap_mask = reg.x_test[:, 0].abs() < 0.8
inside = (reg.x_test[:, 0].abs() > 1.1) & (reg.x_test[:, 0].abs() < 1.9)
variances = {
    "diagonal Laplace": ps.infer.AnalyticPredictive(rmodel, diagonal)(reg.x_test)["var"],
    "subnet, moments": ps.infer.AnalyticPredictive(rmodel, subnet, activations="moments")(reg.x_test)["var"],
    "subnet, sampled network (2000)": subnet.predict(reg.x_test, method="nn", num_samples=2000)[1][:, 0],
    "subnet, linearise": ps.infer.AnalyticPredictive(rmodel, subnet, activations="linearise")(reg.x_test)["var"],
    "subnet, GLM predictive": subnet.predict(reg.x_test)[1][:, 0],
}
for name, var in variances.items():
    std = var.sqrt()
    print(f"{name:31s} predictive std: in the gap {std[gap_mask].mean():.3f}, in the data {std[inside].mean():.3f}")
close = lambda a, b, tol: bool(((variances[a] - variances[b]).abs() / variances[b]).mean() < tol)  # noqa: E731
assert close("subnet, linearise", "subnet, GLM predictive", 1e-4)      # the same predictive, exactly
assert close("subnet, moments", "subnet, sampled network (2000)", 0.05)
glm_std = variances["subnet, GLM predictive"].sqrt()
assert glm_std[gap_mask].mean() > glm_std[inside].mean()
mean = ps.infer.AnalyticPredictive(rmodel, subnet, activations="linearise")(reg.x_test)["mean"]
ps.plots.predictive_band(reg.x_train, reg.y_train, reg.x_test, mean, glm_std, truth=reg.y_test,
                         title="subnetwork Laplace, linearised, analytic", path="analytic_band.png")

# %% [markdown]
# ## Transformers: where to trust it
#
# `nn.TransformerEncoderLayer` blocks are walked too, with diagonal activations. As in the paper,
# the attention matrix comes from the mean queries and keys, and only the values are Gaussian.
# A mean-field posterior trained by SVI tends to leave the query and key weights near the prior.
# The attention is then nearly one-hot on a random token, and the residual stream is a mixture
# rather than a Gaussian. Gaussian moments go wrong where a `LayerNorm` normalises that stream.
#
# Measured on digits (`benchmarks/analytic_predictive.py`, two seeds), at 46-62x the speed of
# 100-sample Monte Carlo:
#
# * pre-norm blocks (ViT, GPT-2): NLL within 1% of Monte Carlo;
# * pre-norm with a final `LayerNorm`: +1.5% to +3.1%;
# * post-norm (PyTorch's default): +6.0% to +9.3%.
#
# For post-norm models, compare with `Predictive` on a validation batch before relying on it.
