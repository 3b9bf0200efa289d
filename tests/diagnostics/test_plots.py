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
