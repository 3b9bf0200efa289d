"""Data-parallel Laplace guides under torchrun (2 gloo processes) equal the single-process ones."""

import torch

# The same problem in the workers and in the reference: 41 examples (uneven shards), float64.
PROBLEM = """
import torch
from torch import nn
import pyro_subnet as ps

def problem():
    torch.manual_seed(0)
    x = torch.randn(41, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (41,))
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model = ps.nn.BayesianNet(net, "classification")
    theta = model.initial_theta(dtype=torch.float64) + 0.3 * torch.randn(model.layout.dim, dtype=torch.float64)
    return model, x, y, theta

def subnet_guide(model):
    return ps.infer.AutoSubnetLaplace(model, subnet=ps.subnet.PredictiveVariance(10, num_probes=32),
                                      prior_precision="marglik", newton_step=True, batch_size=16,
                                      progress=False)

def sampled_guide(model):
    return ps.infer.AutoSampledLaplace(model, num_posterior_samples=8, prior_precision="em", num_em_steps=3,
                                       tol=1e-10, max_iter=300, batch_size=16, newton_step=True, seed=3,
                                       progress=False)

def sampled_guide_sgd(model):
    return ps.infer.AutoSampledLaplace(model, subnet=ps.subnet.LastLayer(), num_posterior_samples=4,
                                       solver="sgd", sgd_lr=0.02, max_iter=5, tol=0.0, batch_size=8, seed=1,
                                       progress=False)

GUIDES = {"subnet": subnet_guide, "sampled": sampled_guide, "sampled_sgd": sampled_guide_sgd}
X_TEST = torch.linspace(-2, 2, 12, dtype=torch.float64)[:, None].expand(12, 3).contiguous()

def fit_all(model, x, y, theta):
    # Count the examples the GGN-vector products see: the ranks must split them, not repeat them.
    from pyro_subnet.infer import curvature
    seen, plain = [0], curvature.ggn_vp
    def counting(fnet, lik, th, xb, *args, **kwargs):
        seen[0] += xb.shape[0]
        return plain(fnet, lik, th, xb, *args, **kwargs)
    curvature.ggn_vp = counting
    try:
        out = _fit_all(model, x, y, theta)
    finally:
        curvature.ggn_vp = plain
    out["ggn_vp_examples"] = torch.tensor(seen[0])
    return out

def _fit_all(model, x, y, theta):
    out = {}
    for name, make in GUIDES.items():
        g = make(model).fit(x, y, map_theta=theta)
        out[name] = dict(loc=g.loc, pred=g.predict(X_TEST), prior=g.prior_prec, idx=g.subnet_indices)
        if name == "subnet":
            out[name].update(scale_tril=g.scale_tril, lml=g.log_marginal_likelihood())
        else:
            out[name].update(samples=g.samples)
    return out
"""

WORKER = PROBLEM + """
import sys
from pyro_subnet.infer import distributed
rank = distributed.init()
model, x, y, theta = problem()
out = fit_all(model, x, y, theta)
torch.save(out, f"{sys.argv[1]}/out_{rank}.pt")
distributed.shutdown()
"""


def _reference():
    ns = {}
    exec(PROBLEM, ns)
    return ns["fit_all"](*ns["problem"]())


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_data_parallel_laplace_guides_equal_the_single_process_guides(torchrun, tmp_path):
    res = torchrun(WORKER)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "out_0.pt"), torch.load(tmp_path / "out_1.pt")
    ref = _reference()
    # the GGN-vector products were shared out between the ranks, not repeated
    # (rounding may move a CG stopping test by an iteration: allow two full passes of 41 examples)
    n0, n1, n = int(r0["ggn_vp_examples"]), int(r1["ggn_vp_examples"]), int(ref["ggn_vp_examples"])
    assert abs(n0 + n1 - n) <= 2 * 41 and n > 1000
    assert 0.4 * n < n0 < 0.6 * n and 0.4 * n < n1 < 0.6 * n
    for name in ("subnet", "sampled", "sampled_sgd"):
        assert _equal(r0[name], r1[name]), name          # every rank holds the same guide
        for key, value in ref[name].items():
            assert value.shape == r0[name][key].shape, (name, key)
            assert torch.allclose(r0[name][key].to(value.dtype), value, atol=1e-6, rtol=0), (name, key)
    assert torch.equal(r0["subnet"]["idx"], ref["subnet"]["idx"])
    # the guides did something: a non-trivial covariance, samples that differ
    assert r0["subnet"]["scale_tril"].shape == (10, 10)
    assert r0["sampled"]["samples"].std() > 1e-3


def test_a_rank_that_raises_inside_the_ggn_stops_the_run(torchrun):
    import time
    start = time.time()
    res = torchrun(PROBLEM + """
from pyro_subnet.infer import distributed
from pyro_subnet.infer.autoguide import subnet_laplace
rank = distributed.init()
model, x, y, theta = problem()
if rank == 1:
    def broken(*args, **kwargs):
        raise RuntimeError("rank 1 failed inside the GGN on purpose")
    subnet_laplace.ggn = broken
subnet_guide(model).fit(x, y, map_theta=theta)   # rank 0 waits in the all-reduce: it must not hang
""", timeout=170)
    assert res.returncode != 0
    assert "rank 1 failed inside the GGN on purpose" in res.stderr + res.stdout
    assert time.time() - start < 150
