"""Keras ImageDataGenerator's flip + shift, as whole-batch tensor ops on the batch's own device.

`ImageDataGenerator(width_shift_range=0.1, height_shift_range=0.1, horizontal_flip=True, fill_mode='nearest')`
draws, per image, a shift uniform in [-3.2, 3.2] px on each axis (10% of 32), resamples the image at the
shifted grid with bilinear interpolation (scipy's `affine_transform`, order 1), fills pixels from outside
with the nearest edge pixel, then mirrors half of the images. Here that is separable: per axis, two
gathers with clamped indices (clamping *is* the nearest fill) and one lerp, for the whole batch at once,
with no host sync; `tests/test_keras_equivalence.py` compares it with Keras' own `apply_transform`.

`shift="pixel"` draws whole-pixel shifts in -3..3 instead (no interpolation, so no blur): one gather per axis,
which also works on uint8 batches. `max_shift` sets the range as a fraction of the side (0.125: 4 px, the fast
recipe's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sharding import step_seed

SHIFTS = ("bilinear", "pixel")
SHIFT_FRACTION = 0.1  # width_shift_range = height_shift_range = 0.1 in the reference


def random_flip_shift(images: torch.Tensor, shift: str = "bilinear", generator: torch.Generator | None = None,
                      max_shift: float = SHIFT_FRACTION) -> torch.Tensor:
    """images: N x C x H x W, float in [0, 1] (uint8 allowed with shift="pixel"), any memory format.

    Returns a new tensor of the same dtype and memory format.
    """
    n, _, h, w = images.shape
    return shift_images(images, *draw_flip_shift(n, h, w, shift, images.device, generator, max_shift))


def draw_flip_shift(n: int, h: int, w: int, shift: str, device, generator: torch.Generator | None = None,
                    max_shift: float = SHIFT_FRACTION):
    """(dy, dx, flip) for n images: each (n, 1), drawn on `device` (flips first, then the shifts). The training loop
    draws them for a step's whole global batch and applies each worker's rows, so the draws do not depend on N."""
    flip = torch.rand((n, 1), device=device, generator=generator) < 0.5
    if shift == "pixel":
        dy = torch.randint(-int(max_shift * h), int(max_shift * h) + 1, (n, 1), device=device, generator=generator)
        dx = torch.randint(-int(max_shift * w), int(max_shift * w) + 1, (n, 1), device=device, generator=generator)
    elif shift == "bilinear":
        # Scalars, not a tensor built from a Python list: that would be a blocking host-to-device copy per step.
        uniform = torch.rand((n, 2), device=device, generator=generator) * 2 - 1
        dy, dx = uniform[:, :1] * (max_shift * h), uniform[:, 1:] * (max_shift * w)
    else:
        raise ValueError(f"shift must be one of {SHIFTS}, got {shift!r}")
    return dy, dx, flip


def step_draws(augment, plan, step: int, idx: torch.Tensor, start: int, size: int, step_size: int, h: int, w: int,
               generator: torch.Generator):
    """(dy, dx, flip) of this worker's `size` images of `step` (from `idx`, at `start` in the epoch's order): the
    whole step's `step_size` draws from the step's own seed, this worker's rows kept, so that they do not depend on
    N; with `augment.first_flips` (`--flip alternate`), each image's flip of its epoch instead."""
    generator.manual_seed(step_seed(plan.seed, plan.epoch, step))
    first = start - step * plan.batch  # this worker's rows of the step's draws
    dy, dx, flip = draw_flip_shift(step_size, h, w, augment.shift, idx.device, generator, augment.max_shift)
    flip = flip[first:first + size]
    if augment.first_flips is not None:  # a function of (image, epoch): independent of N too
        flip = (augment.first_flips[idx] ^ bool(plan.epoch % 2)).unsqueeze(1)
    return dy[first:first + size], dx[first:first + size], flip


def alternating_flips(n: int, seed: int, device) -> torch.Tensor:
    """Bool (n,): whether each of n training images is mirrored in epoch 1. `--flip alternate` mirrors image i in
    epoch e (from 1) iff this xor (e even): every image is seen both ways in every two epochs, where a coin per epoch
    shows a quarter of them the same way twice running (airbench's alternating flip, Jordan 2024)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=generator) < 0.5).to(device)


def shift_images(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Output pixel (i, j) samples the input at (i - dy, j - dx), edge-clamped, then the row is mirrored where
    `flip`. dy, dx: (N, 1), integer (exact gathers) or float (bilinear); flip: bool (N, 1)."""
    n, c, h, w = images.shape
    channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    rows = torch.arange(h, device=images.device) - dy  # N x H sample positions
    cols = torch.arange(w, device=images.device).expand(n, w)
    cols = torch.where(flip, w - 1 - cols, cols) - dx  # flip after the shift, as Keras' apply_transform
    out = _sample(images, rows, axis=2)
    out = _sample(out, cols, axis=3)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out.contiguous()


def _sample(images: torch.Tensor, pos: torch.Tensor, axis: int) -> torch.Tensor:
    """Linear interpolation of `images` at positions `pos` (N x L) along `axis`, indices clamped to the edge."""
    n, c, h, w = images.shape
    size = images.shape[axis]

    def take(index):
        index = index.clamp(0, size - 1)
        shape = (n, 1, -1, 1) if axis == 2 else (n, 1, 1, -1)
        return images.gather(axis, index.view(shape).expand(n, c, h, w))

    if not pos.is_floating_point():
        return take(pos)
    low = pos.floor()
    frac = (pos - low).view((n, 1, -1, 1) if axis == 2 else (n, 1, 1, -1)).to(images.dtype)
    low = low.long()
    return torch.lerp(take(low), take(low + 1), frac)


def resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """A batch downscaled to size x size (bilinear with antialiasing: each output pixel averages the input pixels it
    covers), for cheaper early epochs (`--progressive-resize`); None or the batch's own size: unchanged."""
    if size is None or size == images.shape[-1]:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def to_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 -> float in [0, 1], the reference's only preprocessing (`x.astype('float32') / 255`)."""
    return images.to(dtype).div_(255.0)
