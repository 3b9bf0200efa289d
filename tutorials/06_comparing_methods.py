# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Every method side by side
#
# The same network and data, seven posteriors:
#
# | method | what it approximates | cost |
# |---|---|---|
# | MAP | a point: no weight uncertainty | one optimisation |
# | `AutoSubnetLaplace` | linearised Laplace, full covariance over $k$ chosen weights | $O(k^2)$ memory, $O(k^3)$ time |
# | `AutoSampledLaplace` | linearised Laplace over all weights, by sample-then-optimise | $O(K D)$ memory, CG solves |
# | `SGHMC` | the exact posterior, by mini-batch Hamiltonian dynamics | many gradient steps |
# | `SpikeSlabSGHMC` | the same, with a spike-and-slab prior pruning 90% of the weights | many gradient steps |
# | `AnnealedSMC` | the exact posterior, by particles tempered through the data | particles x steps |
# | `AnalyticPredictive` | `AutoDiagonalLaplace`: linearised Laplace over all weights, diagonal covariance | a GGN diagonal, one forward pass |
#
# The main job, `pyro-subnet`, runs exactly these (`pyro_subnet.main_job.METHODS`); here we call
# them from Python on scikit-learn's breast-cancer set (569 examples, 30 features, two classes)
# and look at the numbers and the reliability diagram together. The Laplace methods share one
# MAP network (`Context.theta_map`), so their differences are those of the posteriors alone.

# %%
import os

import torch

import pyro_subnet as ps
from pyro_subnet.main_job import METHODS, make_context

QUICK = os.environ.get("PYRO_SUBNET_QUICK") == "1"  # the test suite runs tutorials small
if QUICK:
    torch.set_num_threads(1)

ds = ps.data.load_breast_cancer()
ctx = make_context(ds, quick=True, seed=0, progress=False)   # one hidden layer of 50 tanh units
if QUICK:   # keep the samplers short in the test suite
    ctx.options.update({"sghmc": {"num_samples": 20, "warmup_steps": 20},
                        "spike_slab_sghmc": {"num_samples": 20, "warmup_steps": 20},
                        "annealed_smc": {**ctx.options["annealed_smc"], "num_particles": 16}})
print(ds, f"network of {ctx.model.layout.dim} weights")

# %%
results = {name: METHODS[name](ctx) for name in METHODS}
print(f"{'method':20s} {'acc':>6s} {'NLL':>7s} {'ECE':>6s} {'Brier':>6s} {'time s':>7s}")
for r in results.values():
    s = r.scores(ds)
    print(f"{r.name:20s} {s['accuracy']:6.3f} {s['nll']:7.4f} {s['ece']:6.3f} {s['brier']:6.3f} {s['time_s']:7.1f}")
    assert torch.allclose(r.probs.sum(-1), torch.ones(len(r.probs), dtype=r.probs.dtype), atol=1e-4)
    assert s["accuracy"] > 0.85     # every method keeps the MAP network's accuracy, roughly

# %% [markdown]
# Each method also reports its own diagnostics: ArviZ's bulk ESS and R-hat for the samplers, the
# SMC log evidence and number of steps, the evidence-tuned prior precision of the Laplace guides,
# the sparsity reached by the spike-and-slab sampler.

# %%
for r in results.values():
    if r.diagnostics:
        print(f"{r.name:20s}", {k: round(v, 3) if isinstance(v, float) else v for k, v in r.diagnostics.items()})

# %%
ps.plots.reliability_diagram({r.name: r.probs for r in results.values()}, ds.y_test, path="compare_reliability.png")

# %% [markdown]
# What to read from it: on a small, nearly separable set the MAP network is already accurate but
# over-confident on the few hard cases, so its NLL suffers from them; the Bayesian averages
# soften those predictions. Which method wins changes with the data set and the budget; the
# command `pyro-subnet --dataset wine` (or `digits`, `diabetes`, ...) gives the same table for
# another set, and `benchmarks/uci.py` the published UCI regression protocol.
