"""Test inputs under distribution shift and out of distribution, for the main job's evaluation.

What uncertainty is for shows where the test data stop looking like the training data. For each
embedded data set this module gives

* :func:`shifted_inputs`: the test inputs under a shift of growing strength, ``{name: x}``:

  - ``digits``: the 8x8 images rotated by 15, 30, 45 and 60 degrees (``rotate_15`` ...; bilinear
    interpolation, zero padding, in raw pixel units, then standardised as the training data);
  - every other set: Gaussian noise added to the standardised features, with standard deviation
    0.5, 1 and 2 (``noise_0.5`` ...), i.e. a growing fraction of each feature's training spread;

* :func:`ood_inputs`: inputs the training data never saw, ``{name: x}``:

  - ``digits``: the test images inverted (``16 - pixel``: dark digits on a bright ground) and
    images of uniform noise on ``[0, 16]`` per pixel;
  - every other set: standardised features drawn uniformly from ``[-6, 6]``: far outside the
    training data (whose features have unit spread) in most directions.

A method's OOD score is the AUROC of telling the OOD inputs from the in-distribution test inputs
by its predictive uncertainty (:func:`~pyro_subnet.metrics.auroc`): the entropy of the
class probabilities, or the predictive variance for regression.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

from .datasets import Dataset

ROTATIONS = (15, 30, 45, 60)
NOISE_LEVELS = (0.5, 1.0, 2.0)


def rotate_images(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate square images ``(N, side * side)`` about their centre by ``degrees`` (counter-
    clockwise; bilinear interpolation, zero outside the image)."""
    n, d = images.shape
    side = math.isqrt(d)
    if side * side != d:
        raise ValueError(f"rotate_images: {d} features are not a square image.")
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=images.dtype, device=images.device).expand(n, 2, 3)
    img = images.reshape(n, 1, side, side)
    grid = F.affine_grid(theta, img.shape, align_corners=False)
    return F.grid_sample(img, grid, align_corners=False, padding_mode="zeros").reshape(n, d)


def _raw(ds: Dataset, x: torch.Tensor) -> torch.Tensor:
    return x * ds.x_std + ds.x_mean


def _standardised(ds: Dataset, raw: torch.Tensor) -> torch.Tensor:
    return (raw - ds.x_mean) / ds.x_std


def shifted_inputs(ds: Dataset) -> Dict[str, torch.Tensor]:
    """The test inputs under the data set's shifts (see the module docstring), ``{name: x}``."""
    if ds.name == "digits":
        return {f"rotate_{a}": _standardised(ds, rotate_images(_raw(ds, ds.x_test), a)) for a in ROTATIONS}
    g = torch.Generator().manual_seed(0)
    return {f"noise_{s:g}": ds.x_test + s * torch.randn(ds.x_test.shape, generator=g, dtype=ds.x_test.dtype)
            for s in NOISE_LEVELS}


def ood_inputs(ds: Dataset) -> Dict[str, torch.Tensor]:
    """Out-of-distribution inputs for the data set (see the module docstring), ``{name: x}``."""
    g = torch.Generator().manual_seed(1)
    n, d = ds.x_test.shape
    if ds.name == "digits":
        noise = 16.0 * torch.rand(n, d, generator=g, dtype=ds.x_test.dtype)
        return {"inverted": _standardised(ds, 16.0 - _raw(ds, ds.x_test)), "uniform_noise": _standardised(ds, noise)}
    return {"uniform_box": 12.0 * torch.rand(n, d, generator=g, dtype=ds.x_test.dtype) - 6.0}
