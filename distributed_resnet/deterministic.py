"""fp32 training whose numbers do not depend on the number of workers (`--deterministic`). Pure torch, no Ray.

With the global batch split N ways, everything computed per image is bitwise the same whatever N is: a
convolution's output and its input gradient, every elementwise op, the loss of each image. What differs is every
sum over the batch (BatchNorm's statistics and its backward sums, the weight and bias gradients, the gradient
all-reduce): each worker sums its share and the workers add the partial sums, so fp32 rounds them differently for
every N, and training amplifies that rounding (docs/scaling.md). Here every such sum is made independent of the
split, then rounded to fp32 once (`ExactGradients`):
- the small ones gather one fp64 row per image from every worker and add the rows in the global batch's order;
- a convolution's weight gradient is computed per image in fp32 (one convolution with a group per image, about as
  fast as the batched kernel; fp64 convolutions are 4x slower on CPUs), and the images' gradients are added as
  int64 fixed-point numbers on a scale all workers share, which is exact, so the order does not matter.
So N workers compute the bits one worker computes (`tests/test_parallel_and_fast_path.py`), on any thread count.

The layers of `model.py` call `conv2d`, `linear` and `batch_norm` here when an `ExactGradients` is attached
(`enable`) and they are training; their backward returns no parameter gradient to autograd but adds it to
`ExactGradients`, whose `reduce` (in place of DDP's all-reduce) writes each parameter's `.grad`.

Two exceptions to "per image", where the library picks its kernel by the batch's size: oneDNN takes another
kernel for a convolution over one image, whose bits differ, so a worker whose share of a step is one image runs
its convolutions on that image twice and keeps one (`_twice`); and MKL's fp32 GEMM rounds a row differently for
different batch sizes on some CPUs (2 against 4 images on the Xeon with AMX, not on the AVX2 EPYC), so the dense
layer's forward is an elementwise product summed over its inputs, one row per image, like its input gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .sharding import split


class ExactGradients:
    """The gradient of every trainable parameter of a model, summed exactly over the global batch, and the step's split.

    Two kinds of sums, both independent of how the images are split:
    - small ones (BatchNorm's, every bias's, the dense layer's): `sum_over_images` gathers one fp64 row per image
      from every worker and adds them in the global batch's image order, the same rows in the same order for any N;
    - the convolutions' weight gradients (too large to gather): `add_conv` turns each image's fp32 gradient into
      integers on one fixed-point scale shared by all workers (the largest value over the global batch sets it) and
      adds them as int64, exactly and in any order; `reduce` all-reduces the integers and scales them back.
    """

    def __init__(self, model: nn.Module, group=None):
        self.group = group  # None: one worker, nothing to exchange
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        convs = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad}
        device = self.params[0].device
        self.fixed = [p for p in self.params if id(p) in convs]  # int64 sums, one scale each
        self.floating = [p for p in self.params if id(p) not in convs]  # fp64 sums, complete on every worker
        self.ints = torch.zeros(sum(p.numel() for p in self.fixed), dtype=torch.int64, device=device)
        self.sums = torch.zeros(sum(p.numel() for p in self.floating), dtype=torch.float64, device=device)
        self.scales = torch.ones(len(self.fixed), dtype=torch.float64, device=device)
        self.views = {**_views(self.fixed, self.ints), **_views(self.floating, self.sums)}
        self.scale_index = {id(p): i for i, p in enumerate(self.fixed)}
        self.step_size, self.sizes, self.added = None, None, set()

    def begin_step(self, step_size: int) -> None:
        """Zero the sums; `step_size`: the images of the step over all workers (split as `sharding.split` does)."""
        self.ints.zero_()
        self.sums.zero_()
        self.step_size, self.added = step_size, set()
        self.sizes = [split(step_size, self.world, r)[1] for r in range(self.world)]

    def gather_images(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: (this worker's images, K), one per image. Returns every worker's rows, (the step's images, K), in
        the global batch's image order: the same tensor on every worker and for any N (one all-gather)."""
        if self.sizes is None or len(rows) != self.sizes[self.rank]:
            raise ValueError(f"{len(rows)} rows, but begin_step gave this worker "
                             f"{None if self.sizes is None else self.sizes[self.rank]} images")
        if self.group is None:
            return rows
        most = max(self.sizes)
        mine = rows.new_zeros(most, rows.shape[1])
        mine[:len(rows)] = rows
        every = rows.new_empty(self.world * most, rows.shape[1])
        _all_gather(every, mine, group=self.group)
        return torch.cat([every[r * most:r * most + n] for r, n in enumerate(self.sizes)])

    def sum_over_images(self, rows: torch.Tensor) -> torch.Tensor:
        """The sum over the global batch of fp64 `rows` (one per image), in the batch's order: the same bits for any N."""
        return self.gather_images(rows).sum(0)

    def add_whole(self, param: torch.Tensor | None, grad: torch.Tensor) -> None:
        """A gradient already summed over the global batch (`sum_over_images`)."""
        if param is not None and param.requires_grad:
            self.views[id(param)].add_(grad)

    def add_conv(self, param: torch.Tensor, per_image: torch.Tensor, largest: torch.Tensor) -> None:
        """per_image: (this worker's images, *param.shape), fp32: this worker's part of a convolution's weight
        gradient; largest: the largest |value| over the global batch (fp64, the same on every worker). Added in
        integers of 2^-k, where 2^k puts the global batch's sum within int64 (no host sync); each value is truncated
        to that grid (about 2^-56 of the largest: far below fp32's resolution, and the same for any N)."""
        if not param.requires_grad:
            return
        if id(param) in self.added:
            raise ValueError("--deterministic: a convolution used twice in one step is not supported (one scale each)")
        self.added.add(id(param))
        values = per_image.double().flatten(1)
        _, exponent = torch.frexp(largest * self.step_size)  # |sum| <= step_size * largest < 2^exponent
        scale = torch.ldexp(torch.ones_like(largest), 62 - exponent)
        # inf or NaN among the gradients: the sum comes back NaN (as DDP's would), not as wrapped-around integers
        self.scales[self.scale_index[id(param)]] = torch.where(torch.isfinite(largest), scale, torch.nan)
        self.views[id(param)].add_((values * scale).to(torch.int64).sum(0).view_as(param))  # exact, any order

    def reduce(self) -> None:
        """After backward: add up the workers' integer parts, then round every sum into its parameter's `.grad`."""
        if self.group is not None:
            dist.all_reduce(self.ints, group=self.group)
        for i, p in enumerate(self.fixed):
            _set_grad(p, self.views[id(p)].double() / self.scales[i])
        for p in self.floating:
            _set_grad(p, self.views[id(p)])


def _views(params: list[torch.Tensor], flat: torch.Tensor) -> dict[int, torch.Tensor]:
    views, offset = {}, 0
    for p in params:
        views[id(p)] = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return views


def _set_grad(param: torch.Tensor, total: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = total.to(param.dtype, copy=True)
    else:
        param.grad.copy_(total)


_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the first from torch 2.13


def enable(model: nn.Module, group=None) -> ExactGradients:
    """Attach one ExactGradients to every layer of `model` (the model's layers then compute exactly); returns it.
    Every parameter must belong to a layer that computes exactly, or its gradient would be fp32's."""
    grads = ExactGradients(model, group)
    covered = set()
    for m in model.modules():
        if hasattr(m, "exact"):
            m.exact = grads
            covered.update(id(p) for p in m.parameters(recurse=False))
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or tuple(m.dilation) != (1, 1) or m.padding_mode != "zeros"):
            raise ValueError(f"--deterministic: {name} has groups, dilation or a padding mode it does not compute")
    missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if missing:
        raise ValueError(f"--deterministic: no exact layer owns {', '.join(missing)}")
    return grads


def conv2d(x, layer: nn.Conv2d, stride, padding):
    """`F.conv2d(x, layer.weight, layer.bias, stride, padding)` whose weight and bias gradients do not depend on the
    split (`ExactGradients`)."""
    return _Conv.apply(x, layer.weight, layer.bias, layer, tuple(stride), tuple(padding))


def linear(x, layer: nn.Linear):
    return _Linear.apply(x, layer.weight, layer.bias, layer)


def batch_norm(x, layer: nn.BatchNorm2d):
    """Training-mode BatchNorm over the global batch (`layer.exact.group`), its sums in fp64; updates the running
    statistics from the global mean and biased variance (Keras' convention, as `batchnorm.py`)."""
    layer.num_batches_tracked.add_(1)
    return _BatchNorm.apply(x, layer.weight, layer.bias, layer)


def _twice(*batches: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Batches of one image doubled (see the module's docstring); others as they are."""
    return tuple(torch.cat([b, b]) if b.shape[0] == 1 else b for b in batches)


def _first(out: torch.Tensor, n: int) -> torch.Tensor:
    """The first n images of `out`: `out` itself unless `_twice` doubled the batch (a copy, never a view, so that
    an in-place op on it is allowed)."""
    return out if len(out) == n else out[:n].clone()


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.stride, ctx.padding = layer, list(stride), list(padding)
        return _first(F.conv2d(*_twice(x), weight, bias, stride, padding), len(x))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        layer, common = ctx.layer, (ctx.stride, ctx.padding, [1, 1], False, [0, 0], 1)
        grad_in = None
        if ctx.needs_input_grad[0]:  # per image: the same bits whatever else is in the batch
            grad_in = _first(torch.ops.aten.convolution_backward(*_twice(grad_out, x), weight, None, *common,
                                                                 [True, False, False])[0], len(x))
        per_image = _per_image_weight_grads(grad_out, x, weight, ctx.stride, ctx.padding)
        # One gather: each image's bias gradient (before a BatchNorm that sum is ~0, all rounding, so its order
        # matters) and the largest |value| of its weight gradient (the fixed-point scale).
        rows = [per_image.flatten(1).abs().amax(1, keepdim=True).double()]
        if layer.bias is not None:
            rows.insert(0, grad_out.sum((2, 3), dtype=torch.float64))
        every = layer.exact.gather_images(torch.cat(rows, 1))
        if layer.bias is not None:
            layer.exact.add_whole(layer.bias, every[:, :-1].sum(0))
        layer.exact.add_conv(layer.weight, per_image, every[:, -1].max())
        return grad_in, None, None, None, None, None


def _per_image_weight_grads(grad_out, x, weight, stride, padding) -> torch.Tensor:
    """(B, *weight.shape): each image's weight gradient in fp32, by one convolution with B groups (image b is group
    b), whose bits for an image do not depend on the others in the batch nor on the thread count; fp32's rounding
    within an image is the same for any N, and the caller adds the images exactly. About as fast as the batched
    fp32 kernel."""
    n = len(x)
    grad_out, x = _twice(grad_out, x)
    b, c = x.shape[:2]
    if c < 8:  # the stem's 3 channels: oneDNN's grouped kernel splits an image over threads there; a GEMM does not
        cols = F.unfold(x, weight.shape[2:], padding=padding, stride=stride)
        return torch.bmm(grad_out.flatten(2), cols.transpose(1, 2)).view(b, *weight.shape)[:n]
    grouped = torch.ops.aten.convolution_backward(
        grad_out.reshape(1, -1, *grad_out.shape[2:]), x.reshape(1, b * c, *x.shape[2:]), weight.repeat(b, 1, 1, 1),
        None, stride, padding, [1, 1], False, [0, 0], b, [False, True, False])[1]
    return grouped.view(b, *weight.shape)[:n]


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        # Row by row (B x classes x features, small): each image's logits independent of the batch's size.
        out = (x.unsqueeze(1) * weight.unsqueeze(0)).sum(2)
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        g64 = grad_out.double()
        per_image = torch.cat([(g64.unsqueeze(2) * x.double().unsqueeze(1)).flatten(1), g64], 1)
        total = layer.exact.sum_over_images(per_image)
        layer.exact.add_whole(layer.weight, total[:weight.numel()].view_as(weight))
        if layer.bias is not None:
            layer.exact.add_whole(layer.bias, total[weight.numel():])
        # Row by row over the (few) classes: each image's input gradient independent of the batch's size.
        grad_in = (grad_out.unsqueeze(2) * weight.unsqueeze(0)).sum(1) if ctx.needs_input_grad[0] else None
        return grad_in, None, None, None


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        c = x.shape[1]
        x64 = x.double()
        per_image = torch.cat([x64.sum((2, 3)), (x64 * x64).sum((2, 3)), x64.new_full((len(x), 1), x[0, 0].numel())], 1)
        sums = layer.exact.sum_over_images(per_image)
        count = sums[2 * c]
        mean64 = sums[:c] / count
        var64 = (sums[c:2 * c] / count - mean64 * mean64).clamp_min(0)  # biased, exact enough in fp64
        mean, var = mean64.to(x.dtype), var64.to(x.dtype)
        invstd = (var + layer.eps).rsqrt()
        x_hat = (x - mean.view(1, c, 1, 1)) * invstd.view(1, c, 1, 1)
        with torch.no_grad():
            layer.running_mean.lerp_(mean, layer.momentum)
            layer.running_var.lerp_(var, layer.momentum)
        ctx.save_for_backward(x_hat, weight, invstd, count)
        ctx.layer = layer
        return x_hat * weight.view(1, c, 1, 1) + bias.view(1, c, 1, 1)

    @staticmethod
    def backward(ctx, grad_out):
        x_hat, weight, invstd, count = ctx.saved_tensors
        layer, c = ctx.layer, x_hat.shape[1]
        g64 = grad_out.double()
        sums = layer.exact.sum_over_images(torch.cat([g64.sum((2, 3)), (g64 * x_hat.double()).sum((2, 3))], 1))
        layer.exact.add_whole(layer.bias, sums[:c])
        layer.exact.add_whole(layer.weight, sums[c:])
        # dx = w * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)), the means over the global batch
        mean_dy, mean_dy_xhat = (sums[:c] / count).to(x_hat.dtype), (sums[c:] / count).to(x_hat.dtype)
        grad_in = (grad_out - mean_dy.view(1, c, 1, 1) - x_hat * mean_dy_xhat.view(1, c, 1, 1)) \
            * (weight * invstd).view(1, c, 1, 1)
        return grad_in, None, None, None
