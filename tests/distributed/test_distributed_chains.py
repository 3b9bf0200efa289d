"""One SG-MCMC chain per rank (2 gloo processes), gathered on rank 0 into multi-chain ArviZ data."""

import numpy as np
import torch

WORKER = """
import sys, warnings
import numpy as np, pyro, torch
import arviz as az
from torch import nn
import pyro_subnet as ps
from pyro.infer import MCMC
from pyro_subnet.infer import distributed
rank = distributed.init()
g = torch.Generator().manual_seed(0)            # the same data on every rank
x = torch.randn(80, 2, generator=g)
y = x @ torch.tensor([1.0, -1.0]) + 0.5 * torch.randn(80, generator=g)
torch.manual_seed(0)
model = ps.nn.BayesianNet(nn.Linear(2, 1), "regression", noise_scale=0.5)
out = {}
for name, kernel in (("sghmc", ps.infer.SGHMC(model, step_size=1e-3, friction=0.5, subsample_size=20)),
                     ("spike_slab", ps.infer.SpikeSlabSGHMC(model, step_size=1e-3, friction=0.5, spike_scale=0.02,
                                                            subsample_size=20))):
    pyro.set_rng_seed(100 + rank)              # a different chain on every rank
    mcmc = MCMC(kernel, num_samples=60, warmup_steps=30, disable_progbar=True)
    mcmc.run(x, y)
    chains = distributed.gather_chains(mcmc)
    mine = mcmc.get_samples()["weight"]
    if rank == 0:
        idata = ps.to_inference_data(chains)
        post = idata["posterior"]
        rhat = az.rhat(post.to_dataset() if hasattr(post, "children") else post)
        out[name] = dict(weight=torch.as_tensor(np.asarray(post["weight"])), mine=mine,
                         rhat=torch.as_tensor(np.asarray(rhat["weight"])),
                         stats=sorted(idata["sample_stats"].data_vars) if hasattr(idata["sample_stats"], "data_vars") else [],
                         loglik=tuple(idata["log_likelihood"]["obs"].shape))
    else:
        assert chains is None
        torch.save(mine, f"{sys.argv[1]}/{name}_rank1.pt")
if rank == 0:
    torch.save(out, f"{sys.argv[1]}/chains.pt")
distributed.shutdown()
"""


def test_one_chain_per_rank_gathers_into_multi_chain_inference_data(torchrun, tmp_path):
    res = torchrun(WORKER)
    assert res.returncode == 0, res.stderr[:6000]
    out = torch.load(tmp_path / "chains.pt")
    for name in ("sghmc", "spike_slab"):
        r = out[name]
        rank1 = torch.load(tmp_path / f"{name}_rank1.pt")
        w = r["weight"].reshape(2, 60, -1)
        assert w.shape[:2] == (2, 60)                         # (chain, draw): one chain per rank
        assert torch.allclose(w[0], r["mine"].reshape(60, -1).to(w.dtype))   # chain 0 is rank 0's
        assert torch.allclose(w[1], rank1.reshape(60, -1).to(w.dtype))       # chain 1 is rank 1's
        assert not torch.equal(w[0], w[1])                     # different seeds, different chains
        assert np.isfinite(r["rhat"].numpy()).all() and (r["rhat"] > 0.9).all()
        assert r["loglik"][:2] == (2, 60)
        assert "lp" in r["stats"] and "diverging" in r["stats"]
    assert "sparsity" in out["spike_slab"]["stats"] or "inclusion_rate" in out["spike_slab"]["stats"]
