import time

import torch
from torch import nn

from pyro_subnet.infer import fit_map
from pyro_subnet.nn import BayesianNet

SETUP = """
import sys, torch
from torch import nn
import pyro_subnet as ps
from pyro_subnet.infer import distributed
torch.set_default_dtype(torch.float64)
rank = distributed.init()
torch.manual_seed(0)
x = torch.randn(40, 3); y = torch.randint(0, 3, (40,))
model = ps.nn.BayesianNet(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)), "classification")
"""


def _single_process_map():
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        x = torch.randn(40, 3)
        y = torch.randint(0, 3, (40,))
        model = BayesianNet(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)), "classification")
        return fit_map(model, x, y, num_steps=50, lr=0.05, batch_size=None, progress=False).theta
    finally:
        torch.set_default_dtype(torch.float32)


def test_data_parallel_map_equals_the_single_process_map(torchrun, tmp_path):
    res = torchrun(SETUP + """
theta = ps.infer.fit_map(model, x, y, num_steps=50, lr=0.05, batch_size=None, progress=False).theta
torch.save(theta, f"{sys.argv[1]}/theta_{rank}.pt")
distributed.shutdown()
""")
    assert res.returncode == 0, res.stderr[-3000:]
    t0, t1 = torch.load(tmp_path / "theta_0.pt"), torch.load(tmp_path / "theta_1.pt")
    assert torch.equal(t0, t1)  # every rank holds the same weights
    assert torch.allclose(t0, _single_process_map(), atol=1e-6)


def test_a_rank_that_raises_stops_the_whole_run(torchrun):
    start = time.time()
    res = torchrun(SETUP + """
if rank == 1:
    raise RuntimeError("rank 1 failed on purpose")
ps.infer.fit_map(model, x, y, num_steps=10_000, lr=0.05, batch_size=None, progress=False)
""", timeout=170)
    assert res.returncode != 0
    assert "rank 1 failed on purpose" in res.stderr + res.stdout
    assert time.time() - start < 150
