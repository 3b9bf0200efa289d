import math

import pytest
import torch

from pyro_subnet import metrics

PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.4, 0.35, 0.25], [0.05, 0.05, 0.9]], dtype=torch.float64)
Y = torch.tensor([0, 2, 0, 2])


def test_nll_accuracy_brier_by_hand():
    assert metrics.nll(PROBS, Y) == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(0.4) + math.log(0.9)) / 4)
    assert metrics.accuracy(PROBS, Y) == pytest.approx(0.75)
    brier = ((0.3 ** 2 + 0.2 ** 2 + 0.1 ** 2) + (0.1 ** 2 + 0.6 ** 2 + 0.7 ** 2)
             + (0.6 ** 2 + 0.35 ** 2 + 0.25 ** 2) + (0.05 ** 2 + 0.05 ** 2 + 0.1 ** 2)) / 4
    assert metrics.brier(PROBS, Y) == pytest.approx(brier)


def test_ece_by_hand():
    # confidences 0.7, 0.6, 0.4, 0.9, correct 1, 0, 1, 1; with 5 bins of width 0.2:
    # (0.2,0.4]: {0.4 ok}; (0.4,0.6]: {0.6 wrong}; (0.6,0.8]: {0.7 ok}; (0.8,1]: {0.9 ok}
    expected = (abs(1 - 0.4) + abs(0 - 0.6) + abs(1 - 0.7) + abs(1 - 0.9)) / 4
    assert metrics.ece(PROBS, Y, num_bins=5) == pytest.approx(expected)
    # 2 bins: (0, 0.5] holds 0.4 (right); (0.5, 1] holds 0.6 (wrong), 0.7 and 0.9 (right)
    expected2 = 1 / 4 * abs(1 - 0.4) + 3 / 4 * abs(2 / 3 - (0.6 + 0.7 + 0.9) / 3)
    assert metrics.ece(PROBS, Y, num_bins=2) == pytest.approx(expected2)


def test_regression_metrics_by_hand():
    mean = torch.tensor([1.0, 2.0, 3.0])
    y = torch.tensor([1.5, 2.0, 2.0])
    var = torch.tensor([0.25, 1.0, 4.0])
    assert metrics.rmse(mean, y) == pytest.approx(math.sqrt((0.25 + 0 + 1) / 3))
    nll = sum(0.5 * math.log(2 * math.pi * v) + 0.5 * (a - b) ** 2 / v for a, b, v in zip([1, 2, 3], [1.5, 2, 2], [0.25, 1, 4])) / 3
    assert metrics.nll(mean, y, var=var) == pytest.approx(nll)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="shape"):
        metrics.accuracy(PROBS, Y[:3])
    with pytest.raises(ValueError, match="positive"):
        metrics.nll(torch.zeros(2), torch.zeros(2), var=torch.zeros(2))
