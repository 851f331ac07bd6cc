"""What a training step minimises and how: the loss and the optimizer a recipe names.

The loss is softmax + categorical cross-entropy on one-hot targets, as the reference compiles its model;
label smoothing mixes `smoothing / K` into every target (`F.cross_entropy(label_smoothing=...)` computes the
same). The optimizer is Keras' Adam or SGD with (Nesterov) momentum, both with the coupled L2 of `param_groups`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import NUM_CLASSES, param_groups


def training_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0,
                  reduction: str = "mean") -> torch.Tensor:
    """Mean cross-entropy against one-hot targets (`reduction="none"`: each image's), smoothed by `smoothing`; bf16
    logits are promoted to fp32."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # The one-hot rows by a scatter: the same 0s and 1s as F.one_hot, without its range check's read-back to the
    # host (a sync per step on the CPU, and no CUDA graph around it).
    targets = torch.zeros(len(labels), NUM_CLASSES, dtype=logits.dtype, device=logits.device)
    targets.scatter_(1, labels.unsqueeze(1), 1.0)
    if smoothing:
        targets = targets * (1 - smoothing) + smoothing / NUM_CLASSES
    return F.cross_entropy(logits, targets, reduction=reduction)


def build_optimizer(model: torch.nn.Module, cfg, fused: bool) -> torch.optim.Optimizer:
    """`cfg.optimizer` over `param_groups(model, cfg.weight_decay, cfg.weight_decay_on)`; fused kernels when `fused`."""
    groups = param_groups(model, cfg.weight_decay, cfg.weight_decay_on)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               fused=fused or None)
    return torch.optim.Adam(groups, lr=cfg.lr, eps=cfg.adam_eps, fused=fused or None)
