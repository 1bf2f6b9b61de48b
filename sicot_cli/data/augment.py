"""Batched augmentation on the device: random resized crop and horizontal flip in ONE op.

Each image gets its own crop (area fraction in ``scale``, aspect ratio in [3/4, 4/3], random
position) and flip, expressed as an affine sampling grid; ``grid_sample`` then resamples the whole
batch at once (bilinear), on whatever device the batch is on. The random parameters come from a
CPU generator seeded per batch, so a batch's augmentation does not depend on the device or on what
ran before it (exact resume).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def crop_flip_params(
    n: int, generator: torch.Generator, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> torch.Tensor:
    """Affine matrices ``[n, 2, 3]`` mapping output coordinates to input ones (normalised [-1, 1])."""
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    return theta


def random_resized_crop_flip(
    images: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.35, 1.0),
    offset: int = 0,
    total: int = 0,
) -> torch.Tensor:
    """uint8 (or float) images ``[B, 3, S, S]`` -> augmented float images in [0, 255], same size.

    Distributed: the parameters are drawn for the whole global batch of ``total`` images and this
    rank's slice ``[offset, offset + B)`` is used, so every image is augmented as in one process.
    """
    x = images.float()
    n = x.shape[0]
    theta = crop_flip_params(total or n, generator, scale)[offset : offset + n].to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
