"""BatchNorm over the whole global batch, on any backend (gloo on CPUs included), with Keras' running variance.

`torch.nn.SyncBatchNorm` only runs on CUDA (and XPU/HPU), and folds the *unbiased* batch variance into its
running variance, where Keras folds the biased one. `BatchNorm2d` here is a drop-in `nn.BatchNorm2d` (same
parameters and buffers, so checkpoints and Keras weights load unchanged) whose training-mode statistics are
those of every worker's images together when `process_group` is set, and of this worker's alone otherwise:
- forward: torch's fused kernel normalizes with this worker's mean and biased variance; the workers all-gather
  (mean, variance, count) and combine them exactly (Chan's parallel formula), and one per-channel affine map
  turns the local normalization into the global one;
- backward: torch's fused backward (with the global statistics) gives this worker's per-channel sums of dy and
  dy * x_hat; the workers all-gather and add them, and the input gradient gets the global-batch correction.
One all-gather per layer each way (gloo's all_gather of a few hundred floats is cheaper than its all_reduce).
With one worker (or none) it makes no collective and is torch's own batch norm, fused forward and backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import deterministic


class BatchNorm2d(nn.BatchNorm2d):
    process_group = None  # set by `use_global_statistics`; None: this worker's batch only
    exact = None  # a deterministic.ExactGradients (`--deterministic`): sums that do not depend on the split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        if self.exact is not None:
            return deterministic.batch_norm(x, self)
        self.num_batches_tracked.add_(1)
        return _GlobalBatchNorm.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                      self.momentum, self.eps, self.process_group)


def use_global_statistics(model: nn.Module, process_group) -> int:
    """Point every BatchNorm2d of `model` at `process_group` (None: per-worker statistics); returns how many."""
    layers = [m for m in model.modules() if isinstance(m, BatchNorm2d)]
    for m in layers:
        m.process_group = process_group
    return len(layers)


def _world(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _gather_rows(rows: torch.Tensor, group, world: int) -> torch.Tensor:
    """Every worker's `rows` (a flat fp32 tensor), stacked in rank order: the same tensor on every worker."""
    out = torch.empty(world * rows.numel(), dtype=rows.dtype, device=rows.device)
    _all_gather(out, rows.contiguous(), group=group)
    return out.view(world, rows.numel())


_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the first from torch 2.13


class _GlobalBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, group):
        world = _world(group)
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        var = invstd.pow(-2) - eps  # this worker's biased variance
        count = x.numel() // x.shape[1]
        total = count
        if world > 1:
            c, acc = mean.numel(), _accumulation_dtype(x)
            stats = torch.cat([mean.to(acc), var.to(acc), mean.new_full((1,), count, dtype=acc)])
            rows = _gather_rows(stats, group, world)
            means, variances, counts = rows[:, :c], rows[:, c:2 * c], rows[:, 2 * c:]
            total = counts.sum()  # a device scalar: reading it on the host would sync the stream
            local_mean, local_invstd = mean, invstd
            mean = (counts * means).sum(0) / total
            var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
            invstd = (var + eps).rsqrt()
            # From the locally normalized output to the globally normalized one: one affine map per channel, close
            # to the identity (torch's eval-mode kernel would fold x * scale + shift and lose digits when |mean|
            # is large against the standard deviation).
            ratio = invstd / local_invstd
            shift = (local_mean - mean) * invstd * weight + bias * (1 - ratio)
            out = torch.addcmul(shift.view(1, -1, 1, 1), out, ratio.view(1, -1, 1, 1)).to(out.dtype)
        with torch.no_grad():  # Keras: moving = momentum * moving + (1 - momentum) * batch, biased variance
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_(var.to(running_var.dtype), momentum)
        ctx.save_for_backward(x, weight, mean, invstd, var)
        ctx.eps, ctx.group, ctx.world, ctx.total = eps, group, world, total
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd, var = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=_memory_format(x))
        if ctx.world == 1:
            gi, gw, gb = torch.ops.aten.native_batch_norm_backward(grad_out, x, weight, None, None, mean, invstd,
                                                                   True, ctx.eps, [True, True, True])
            return gi, gw, gb, None, None, None, None, None
        # torch's fused backward, normalizing with the global statistics but taking the means of dy and dy * x_hat
        # over this worker's images; it also returns their sums, which the workers add up. The input gradient
        # then gets the (small) difference between the local and the global means: no cancellation of large terms.
        gi, gw, gb = torch.ops.aten.native_batch_norm_backward(grad_out, x, weight, None, None, mean, invstd,
                                                               True, ctx.eps, [True, True, True])
        c, local = gw.numel(), x.numel() // x.shape[1]
        acc = _accumulation_dtype(x)
        sums = _gather_rows(torch.cat([gw.to(acc), gb.to(acc)]), ctx.group, ctx.world).sum(0)
        scale = weight.to(acc) * invstd
        # d x = w * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)), the means over the global batch
        coef_x = scale * invstd * (gw.to(acc) / local - sums[:c] / ctx.total)
        coef_0 = scale * (gb.to(acc) / local - sums[c:] / ctx.total) - coef_x * mean
        gi = gi + torch.addcmul(coef_0.view(1, c, 1, 1), x, coef_x.view(1, c, 1, 1)).to(gi.dtype)
        return gi, gw, gb, None, None, None, None, None


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for bf16 and fp32 inputs, fp64 for fp64 (the tests' exact runs)."""
    return torch.promote_types(x.dtype, torch.float32)


def _memory_format(x: torch.Tensor):
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format
