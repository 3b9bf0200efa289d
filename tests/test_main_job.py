"""The main job's shared pieces: the MAP fits from fresh initialisations that the deep ensemble
and the SG-MCMC chain starts share."""

import pytest
import torch

from pyro_subnet.data.datasets import load_wine
from pyro_subnet.main_job import make_context, mlp, sgmcmc_posterior


@pytest.fixture(scope="module")
def ctx():
    torch.set_num_threads(1)
    context = make_context(load_wine(), quick=True, progress=False, hidden=(8,))
    context.map_steps = 300
    return context


def test_fresh_start_is_the_main_jobs_initialisation(ctx):
    """A fresh start re-initialises a copy of the model's network: the same weights the main
    job's MLP gets when it is built from the same seed."""
    model, init = ctx.fresh_start(7)
    torch.manual_seed(7)
    net = mlp(ctx.ds.num_features, ctx.ds.num_outputs, (8,))
    expected = model.layout.flatten({n: p.detach() for n, p in net.named_parameters()})
    assert torch.equal(init, expected)
    assert model is not ctx.model and model.prior_scale == ctx.model.prior_scale


def test_map_members_start_with_the_shared_map_and_are_fitted_once(ctx):
    members = ctx.map_members(2)
    assert members[0][1] is ctx.theta_map
    theta1 = members[1][1]
    assert (theta1 - ctx.theta_map).norm() > 0.1 * ctx.theta_map.norm()     # another optimum
    x, y = ctx.ds.x_train, ctx.ds.y_train
    accuracy = (ctx.model.network.flat(theta1, x).argmax(-1) == y).float().mean()
    assert accuracy > 0.9                                                  # and a fitted one
    assert ctx.map_members(2)[1][1] is theta1                             # shared, not refitted


@pytest.mark.parametrize("starts", ["maps", "map"])
def test_each_sgmcmc_chain_starts_at_its_own_map(ctx, starts):
    ctx.options["sghmc"] = {"num_chains": 2, "chain_starts": starts}
    mcmc, _, _ = sgmcmc_posterior(ctx, num_samples=3, warmup_steps=5, steps_per_sample=1)
    first = ctx.model.layout.flatten({k: v[:, 0] for k, v in mcmc.get_samples(group_by_chain=True).items()})
    candidates = [theta for _, theta, _ in ctx.map_members(2)]       # the shared MAP, another MAP
    for chain in range(2):
        distances = torch.stack([(first[chain] - c).norm() for c in candidates])
        assert int(distances.argmin()) == (chain if starts == "maps" else 0), (chain, distances)
    ctx.options["sghmc"] = {"chain_starts": "nowhere"}
    with pytest.raises(ValueError, match="chain_starts"):
        sgmcmc_posterior(ctx, num_samples=3, warmup_steps=5)
    ctx.options.pop("sghmc")
