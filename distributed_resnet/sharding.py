"""Which images, and which random draws, each worker takes at each step: functions of (seed, epoch, step) and
never of the worker count, so N workers compute the step one worker would. Pure numpy, no torch, no Ray.

An epoch is one seeded permutation of the training images; step s is its slice [s*B, (s+1)*B) (the last one
shorter), the same global batch B whatever N is. Each worker takes a contiguous part of that slice, as even as
can be (43/43/42 of 128 for 3 workers), and weighs its mean loss by N * its share, so that DDP's average of the
gradients is the gradient of the mean over the global batch. Augmentation draws for the whole global batch from a
generator seeded by (seed, epoch, step); each worker applies its part.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import UserError


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of the n training images (the same on every worker)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, batch: int) -> int:
    return math.ceil(n / batch)


def split(count: int, world: int, rank: int) -> tuple[int, int]:
    """(start, size) of worker `rank`'s part of `count` items: sizes differ by at most one, larger first."""
    base, extra = divmod(count, world)
    return rank * base + min(rank, extra), base + (rank < extra)


def step_slice(n: int, batch: int, step: int, world: int, rank: int) -> tuple[int, int, int]:
    """(first index into the epoch's order, images of this worker, images of the whole step) for one step."""
    step_start = step * batch
    step_size = min(batch, n - step_start)
    start, size = split(step_size, world, rank)
    return step_start + start, size, step_size


def smallest_step(n: int, batch: int) -> int:
    """Images in an epoch's smallest step (its last one): every worker must get at least one."""
    return n - (steps_per_epoch(n, batch) - 1) * batch


def check_last_step_fits(n: int, batch: int, workers: int) -> None:
    """Every worker needs an image of every step, the last (smallest) one too: a one-line UserError otherwise.
    Checked on the driver before Ray starts, and in the loop, which Tune trials reach without that driver."""
    last = smallest_step(n, batch)
    if last < max(1, workers):
        raise UserError(f"the last batch of an epoch has {last} image(s), fewer than --num-workers {workers}: every "
                        f"worker needs one; use fewer workers or another --batch-size or --max-train-samples")


def step_seed(seed: int, epoch: int, step: int) -> int:
    """Seed of a step's augmentation generator."""
    return int(np.random.SeedSequence([seed, epoch, step, 1]).generate_state(2, np.uint64)[0] >> 2)


def flip_seed(seed: int) -> int:
    """Seed of the per-image coins of alternating flips (`--flip alternate`)."""
    return int(np.random.SeedSequence([seed, 2]).generate_state(2, np.uint64)[0] >> 2)
