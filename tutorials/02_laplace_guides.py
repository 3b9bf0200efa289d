# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Linearised Laplace as a Pyro AutoGuide: subnetworks and sample-then-optimise
#
# The linearised Laplace approximation replaces the network $f(x, \theta)$ by its first-order
# expansion around the MAP $\theta_*$, $f_{\rm lin}(x,\theta) = f(x,\theta_*) + J(x)(\theta-\theta_*)$.
# With a Gaussian prior $N(0, A^{-1})$ the posterior of the linearised model is Gaussian with
# precision
#
# $$H = G + A, \qquad G = \sum_n J_n^\top \Lambda_n J_n,$$
#
# the generalised Gauss-Newton matrix ($\Lambda_n$ the Hessian of $-\log p(y_n\mid f)$ in the
# output). Two guides build it:
#
# * `ps.infer.AutoSubnetLaplace` (Daxberger et al., ICML 2021) keeps every weight at its MAP
#   except a subnetwork $S$ of $k$ weights chosen to keep the most predictive variance, and stores
#   the dense $k \times k$ covariance $(G_S + A_S)^{-1}$. Cost $O(k^2)$ memory, $O(k^3)$ time.
# * `ps.infer.AutoSampledLaplace` (Antorán et al., ICLR 2023) works over *every* weight. It never
#   forms $G$: each posterior sample solves a randomised least-squares problem
#   $\zeta = \arg\min_z \tfrac12 z^\top G z + \tfrac12 (z-t)^\top A (z-t)$ with
#   $t = A^{-1/2}u + A^{-1}\sum_n J_n^\top L_n e_n$, so $\zeta \sim N(0, H^{-1})$, using only
#   Jacobian-vector products. Its EM loop tunes the prior precision by
#   $a \leftarrow \gamma / \|\bar\theta\|^2$ with $\gamma = \frac1K\sum_j \zeta_j^\top G\zeta_j$.
#
# Both are AutoGuides: `guide(x)` draws every weight site, so `pyro.infer.Predictive` and ArviZ
# work as with `AutoNormal`.

# %%
import os

import arviz as az
import torch
from pyro.infer import Predictive
from torch import nn

import pyro_subnet as ps

QUICK = os.environ.get("PYRO_SUBNET_QUICK") == "1"  # the test suite runs tutorials small
if QUICK:
    torch.set_num_threads(1)
torch.manual_seed(0)

# %% [markdown]
# ## Regression with a gap
#
# Inputs from $[-2,-1]$ and $[1,2]$ only: an honest posterior is unsure in between. A 1-50-1 tanh
# network (151 weights), trained to its MAP once; both guides take that MAP (`map_theta=`), so
# the comparison is of the posteriors alone.

# %%
ds = ps.data.gap_regression(n=60 if QUICK else 200, noise=0.1, dtype=torch.float64)
net = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1)).double()
model = ps.nn.BayesianNet(net, likelihood="regression", noise_scale=0.1, prior_scale=1.0)
theta_map = ps.infer.fit_map(model, ds.x_train, ds.y_train, num_steps=500 if QUICK else 3000, lr=1e-2,
                             batch_size=None, progress=False).theta
print(f"{model.layout.dim} weights")

# %% [markdown]
# **AutoSubnetLaplace** over 30 weights picked by `ps.subnet.LargestVariance` (the diagonal
# Laplace variance ranks them; `PredictiveVariance` and `LargestMagnitude` are the other
# strategies), with the prior precision tuned by the Laplace evidence (`"marglik"`).

# %%
subnet = ps.infer.AutoSubnetLaplace(
    model, subnet=ps.subnet.LargestVariance(30, method="diag_laplace"), prior_precision="marglik",
    progress=False).fit(ds.x_train, ds.y_train, map_theta=theta_map)
mean_s, var_s = subnet.predict(ds.x_test)          # GLM predictive, observation noise included
print(f"subnet prior precision {float(subnet.prior_prec.mean()):.3g}, "
      f"log evidence {float(subnet.log_marginal_likelihood()):.1f}")

# %% [markdown]
# **AutoSampledLaplace** over all weights with 64 samples and EM for the prior precision. Each EM
# step warm-starts the batched conjugate-gradient solve from the last one; `em_trace` holds the
# precision, $\gamma$, the CG iterations and the final residual of each step.

# %%
sampled = ps.infer.AutoSampledLaplace(model, num_posterior_samples=64, prior_precision="em",
                                      num_em_steps=4 if QUICK else 10, tol=1e-5, progress=False)
sampled.fit(ds.x_train, ds.y_train, map_theta=theta_map)
mean_a, var_a = sampled.predict(ds.x_test)
for a, gamma, iters, resid in sampled.em_trace.tolist():
    print(f"  prior precision {a:8.3g}  effective parameters {gamma:6.1f}  CG iterations {int(iters):3d}  "
          f"residual {resid:.1e}")

# %%
gap = ds.x_test[:, 0].abs() < 0.8
inside = (ds.x_test[:, 0].abs() > 1.1) & (ds.x_test[:, 0].abs() < 1.9)
for name, var in [("subnet k=30", var_s), ("all weights, sampled", var_a)]:
    std = var[:, 0].sqrt()
    print(f"{name:22s} predictive std: in the data {std[inside].mean():.3f}, in the gap {std[gap].mean():.3f}")
    assert std[gap].mean() > std[inside].mean()      # more unsure where there is no data
ps.plots.predictive_band(ds.x_train, ds.y_train, ds.x_test, mean_s[:, 0], var_s[:, 0].sqrt(),
                         truth=ds.y_test, title="AutoSubnetLaplace, k=30", path="subnet_band.png")
ps.plots.predictive_band(ds.x_train, ds.y_train, ds.x_test, mean_a[:, 0], var_a[:, 0].sqrt(),
                         truth=ds.y_test, title="AutoSampledLaplace, all weights", path="sampled_band.png")

# %% [markdown]
# ## Same posterior, two routes
#
# On a subnetwork small enough for the dense guide, sampling must agree with it. Give both the
# same 30 indices and the same prior precision: the sample covariance of the 256 draws matches
# $(G_S + A)^{-1}$ within Monte Carlo error, and so do the predictive variances.

# %%
idx = subnet.subnet_indices
same = ps.infer.AutoSampledLaplace(model, subnet=idx, prior_precision=subnet.prior_prec, num_posterior_samples=256,
                                   tol=1e-8, progress=False).fit(ds.x_train, ds.y_train, map_theta=theta_map)
dense_cov = subnet.posterior_covariance
sample_cov = same.samples.T @ same.samples / same.samples.shape[0]
rel = ((sample_cov.diagonal() - dense_cov.diagonal()) / dense_cov.diagonal()).abs().mean()
_, v_dense = subnet.predict(ds.x_test, observation_noise=False)
_, v_same = same.predict(ds.x_test, observation_noise=False)
rel_pred = ((v_same - v_dense).abs() / v_dense).mean()
print(f"marginal variances differ by {float(rel):.1%} on average (MC error ~{(2 / 256) ** 0.5:.0%}), "
      f"predictive variances by {float(rel_pred):.1%}")
assert rel < 0.25 and rel_pred < 0.25

# %% [markdown]
# ## Pyro and ArviZ
#
# The guides are AutoGuides, so `Predictive(model, guide=...)` draws networks (here in one
# vmapped pass, `parallel=True`), and `ps.to_inference_data` draws `num_samples` from the guide
# (as two chains) and adds the pointwise log-likelihood `az.loo` needs.

# %%
draws = Predictive(model, guide=subnet, num_samples=100, parallel=True)(ds.x_test)
print({k: tuple(v.shape) for k, v in draws.items()})
idata = ps.to_inference_data(subnet, ds.x_train, ds.y_train, num_samples=100)
print(az.loo(idata))

# %% [markdown]
# ## Classification: digits
#
# The same guides on a classifier, with the probit approximation of the GLM predictive,
# $p(y\mid x) \approx \mathrm{softmax}\big(\bar f / \sqrt{1 + \tfrac{\pi}{8}\mathrm{diag}\,\Sigma_f}\big)$.
# The reliability diagram shows how close confidence is to accuracy.

# %%
digits = ps.data.load_digits()
clf = ps.nn.BayesianNet(nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)),
                        likelihood="classification", prior_scale=1.0)
theta_clf = ps.infer.fit_map(clf, digits.x_train, digits.y_train, num_steps=300 if QUICK else 2000, lr=1e-2,
                             batch_size=128, progress=False).theta
probs = {"MAP": torch.softmax(clf.network.flat(theta_clf, digits.x_test), -1).detach()}
probs["AutoSubnetLaplace k=200"] = ps.infer.AutoSubnetLaplace(
    clf, subnet=ps.subnet.LargestVariance(200, method="diag_laplace"), prior_precision="marglik",
    progress=False).fit(digits.x_train, digits.y_train, map_theta=theta_clf).predict(digits.x_test)
probs["AutoSampledLaplace"] = ps.infer.AutoSampledLaplace(
    clf, num_posterior_samples=32, prior_precision="em", num_em_steps=3, tol=1e-3, max_iter=100,
    progress=False).fit(digits.x_train, digits.y_train, map_theta=theta_clf).predict(digits.x_test)
for name, p in probs.items():
    assert torch.allclose(p.sum(-1), torch.ones(len(p), dtype=p.dtype), atol=1e-5)
    print(f"{name:24s} accuracy {ps.metrics.accuracy(p, digits.y_test):.3f}  NLL {ps.metrics.nll(p, digits.y_test):.3f}"
          f"  ECE {ps.metrics.ece(p, digits.y_test):.3f}")
ps.plots.reliability_diagram(probs, digits.y_test, path="digits_reliability.png")
