"""Keras ImageDataGenerator's flip + shift, as whole-batch tensor ops on the batch's own device.

`ImageDataGenerator(width_shift_range=0.1, height_shift_range=0.1, horizontal_flip=True, fill_mode='nearest')`
shifts each image by up to 10% of its size and mirrors half of them; pixels shifted in copy the nearest edge
pixel. With whole-pixel shifts (up to 3 px on 32 px) that is an index remap: output pixel (i, j) reads input
pixel (clamp(i - dy), clamp(j - dx)), with the column mirrored first for flipped images. Clamping the index
*is* the nearest fill, and one gather per axis does the whole batch, so uint8 batches stay on the GPU.
"""

from __future__ import annotations

import torch


def random_flip_shift(images: torch.Tensor, max_shift: int = 3, generator: torch.Generator | None = None) -> torch.Tensor:
    """images: uint8 or float, N x C x H x W (any memory format). Returns a new tensor of the same dtype."""
    n, c, h, w = images.shape
    dev = images.device
    dy = torch.randint(-max_shift, max_shift + 1, (n, 1), device=dev, generator=generator)
    dx = torch.randint(-max_shift, max_shift + 1, (n, 1), device=dev, generator=generator)
    flip = torch.rand((n, 1), device=dev, generator=generator) < 0.5
    return shift_images(images, dy, dx, flip)


def shift_images(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Deterministic core of `random_flip_shift`: dy, dx int (N, 1); flip bool (N, 1)."""
    n, c, h, w = images.shape
    rows = (torch.arange(h, device=images.device) - dy).clamp_(0, h - 1)  # N x H
    cols = torch.arange(w, device=images.device).expand(n, w)
    cols = torch.where(flip, w - 1 - cols, cols)
    cols = (cols - dx).clamp_(0, w - 1)  # N x W
    out = images.gather(2, rows[:, None, :, None].expand(n, c, h, w))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [0, 1], the reference's only preprocessing (`x.astype('float32') / 255`)."""
    return images.float().div_(255.0)
