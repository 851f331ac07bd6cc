"""Eval-mode logits of a model over uint8 images on their device, in fp32, a batch at a time: what the training
loop's evaluation, `evaluate`, `export` and the tests share. torch only, no Ray: the tools over checkpoints start
without importing Ray Train (seconds on a small machine).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .augment import to_float
from .device import exact_fp32
from .model import NUM_CLASSES


@torch.no_grad()
def predict(model, images: torch.Tensor, batch: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Logits for images[start:stop], in eval mode and fp32 (bf16 rounding in the val loss would be of the order
    of ReduceLROnPlateau's min_delta), a batch at a time."""
    model.eval()
    stop = len(images) if stop is None else stop
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    with exact_fp32():
        out = [model(to_float(images[i:min(i + batch, stop)], dtype)) for i in range(start, stop, batch)]
    return torch.cat(out) if out else torch.zeros(0, NUM_CLASSES, device=images.device, dtype=dtype)


def images_to_tensor(images: np.ndarray, device, channels_last: bool) -> torch.Tensor:
    """N x H x W x C uint8 -> N x C x H x W uint8 on `device` (channels_last keeps the NHWC bytes as they are)."""
    with warnings.catch_warnings():  # arrays from the object store or the cache are read-only; nothing writes them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2)
    return t if channels_last else t.contiguous()
