import numpy as np
import torch

import pyro_subnet as ps


def test_reliability_bins_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    conf, acc, count = ps.plots.reliability_bins(probs, y, num_bins=2)
    # (0.5, 1] holds every example: confidences 0.9, 0.8, 0.7, 0.55, right, wrong, right, wrong
    assert count.tolist() == [0, 4]
    assert np.isclose(conf[1], (0.9 + 0.8 + 0.7 + 0.55) / 4) and np.isclose(acc[1], 0.5)


def test_plots_write_png_files(tmp_path):
    probs = torch.softmax(torch.randn(50, 3), -1)
    y = torch.randint(0, 3, (50,))
    paths = [tmp_path / n for n in ("rel.png", "band.png", "smc.png", "incl.png")]
    ps.plots.reliability_diagram({"a": probs}, y, path=paths[0])
    x = torch.linspace(-2, 2, 30)
    ps.plots.predictive_band(x, x.sin(), x, x.sin(), 0.1 + x.abs(), path=paths[1])
    ps.plots.smc_traces({"ess": [1.0, 0.5, 0.9], "data_fraction": [0.1, 0.5, 1.0]}, path=paths[2])
    ps.plots.inclusion_histogram({"w": torch.rand(100)}, path=paths[3])
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_read_the_methods_own_outputs(tmp_path):
    """smc_traces takes AnnealedSMC.diagnostics() as it is (one line a chain) and
    inclusion_histogram SpikeSlabSGHMC.inclusion_probabilities()."""
    import pyro
    from pyro.infer import MCMC
    from torch import nn

    from pyro_subnet.infer import AnnealedSMC, SpikeSlabSGHMC
    torch.manual_seed(0)
    x = torch.randn(30, 2)
    y = (x[:, 0] > 0).long()
    model = ps.nn.BayesianNet(nn.Linear(2, 2), "classification")
    smc = AnnealedSMC(model, num_particles=16, batch_size=10, num_chains=2, seed=0, progress=False)
    smc.run(x, y)
    d = smc.diagnostics()
    fig = ps.plots.smc_traces(d, path=tmp_path / "smc.png")
    assert [ax.get_ylabel() for ax in fig.axes] == ["ESS (particles)", "acceptance rate", "data included",
                                                    "step size"]
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), d["ess"]["chain 0"])
    np.testing.assert_allclose(fig.axes[2].lines[-1].get_ydata(), d["num_data"]["chain 1"])
    one = ps.plots.smc_traces({k: v["chain 0"] for k, v in d.items()})   # one chain's series
    np.testing.assert_allclose(one.axes[1].lines[0].get_ydata(), d["acceptance_rate"]["chain 0"])

    pyro.set_rng_seed(0)
    kernel = SpikeSlabSGHMC(model, step_size=1e-2, friction=0.5, spike_scale=0.1)
    MCMC(kernel, num_samples=5, warmup_steps=5, disable_progbar=True).run(x, y)
    rho = kernel.inclusion_probabilities()
    fig = ps.plots.inclusion_histogram(rho, path=tmp_path / "incl.png")
    heights = np.array([p.get_height() for p in fig.axes[0].patches])
    assert heights.sum() == rho["weight"].numel()
    for p in ("smc.png", "incl.png"):
        assert (tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
