"""A training step that a CUDA graph can capture: static buffers, no host sync, the LR in a device tensor.

The eager step (`worker.train_epoch`) slices the epoch's order and seeds a generator on the host at every step,
and sets the LR as a Python float; a captured graph replays fixed kernels on fixed addresses. So here the host only
*launches* copies into static buffers before each step (this step's image indices, its augmentation draws, its
LR: device-side copies and a fill, never a sync), and the step itself reads nothing else. The draws are the eager
step's own (the same per-step seeds, the whole global batch drawn, this worker's rows kept), so both steps train
the same numbers. On CUDA the step is captured once, after a few eager steps, and replayed from then on;
elsewhere (the CPU tests) the same step runs eagerly. The last, smaller step of an epoch runs eagerly through the
same code.

Single worker only: capturing DDP's all-reduce and the global BatchNorm's all-gathers needs NCCL (gloo's
collectives run on the host) and so one GPU per worker, which no machine this project runs on has had; untested
code would be a claim. Several runs sharing one GPU each capture their own step (`bench --packed`).
"""

from __future__ import annotations

import torch

from .augment import resize, shift_images, step_draws, to_float
from .optim import training_loss

WARMUP_STEPS = 3  # eager steps on a side stream before the capture


def tensor_lr(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Every param group's LR as one 0-dim tensor on the parameters' device (fused Adam and SGD take it as is), so
    that setting it is a fill, not a Python float a graph would bake in."""
    device = optimizer.param_groups[0]["params"][0].device
    lr = optimizer.param_groups[0]["lr"]
    if not (isinstance(lr, torch.Tensor) and lr.device == device):  # one tensor, shared by every step built on it
        lr = torch.tensor(float(lr), dtype=torch.float32, device=device)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if device.type == "cuda" and "capturable" in group:
            group["capturable"] = True  # Adam's step counter stays on the device
    return lr


class GraphSafeStep:
    """One worker's training step over fixed-size batches of a device-resident uint8 training set."""

    def __init__(self, model, optimizer, images, labels, batch: int, augment, fast: bool, smoothing: float = 0.0,
                 side: int | None = None, cuda_graph: bool | None = None):
        """`cuda_graph`: capture the step (default: on CUDA). The optimizer should be fused (the bf16 path builds
        it so): the foreach and single-tensor forms read a tensor LR back to the host."""
        self.model, self.optimizer, self.images, self.labels = model, optimizer, images, labels
        self.augment, self.fast, self.smoothing, self.side = augment, fast, smoothing, side
        device = images.device
        self.batch, self.device = batch, device
        self.dtype = next(model.parameters()).dtype
        self.lr = tensor_lr(optimizer)
        self.idx = torch.zeros(batch, dtype=torch.long, device=device)
        shifts = torch.long if augment and augment.shift == "pixel" else torch.float32  # whole pixels: exact gathers
        self.dy = torch.zeros(batch, 1, dtype=shifts, device=device)
        self.dx = torch.zeros(batch, 1, dtype=shifts, device=device)
        self.flip = torch.zeros(batch, 1, dtype=torch.bool, device=device)
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, correct) over the epoch
        self.generator = torch.Generator(device=device)
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        self.graph, self.eager_steps = None, 0

    def _body(self, idx, dy, dx, flip, sums) -> None:
        """The step: gather, augment, forward, backward, optimizer, running sums; only device tensors in and out."""
        x = to_float(self.images[idx], self.dtype)
        if self.augment:
            x = shift_images(x, dy, dx, flip)
        x = resize(x, self.side)
        if self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        y = self.labels[idx]
        # No autocast cache: a captured graph must not keep casts of the weights from before their update.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.fast, cache_enabled=False):
            logits = self.model(x)
        loss = training_loss(logits, y, self.smoothing)
        self.optimizer.zero_grad(set_to_none=False)  # the gradients keep their addresses
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            sums += torch.stack([loss.detach().double() * len(idx), (logits.argmax(1) == y).sum().double()])

    def _prepare(self, plan, step: int, order) -> tuple[int, tuple | None]:
        """This step's inputs: launched into the static buffers for a full step, returning (its images, None); for
        the epoch's last, smaller step (its images, its own index and draw tensors)."""
        start, size, step_size = plan.step(step)
        idx = order[start:start + size]
        _, _, h, w = self.images.shape
        draws = step_draws(self.augment, plan, step, idx, start, size, step_size, h, w, self.generator) \
            if self.augment else (None, None, None)
        if size != self.batch:
            return size, (idx, *draws)
        self.idx.copy_(idx)
        if self.augment:
            for buffer, drawn in zip((self.dy, self.dx, self.flip), draws):
                buffer.copy_(drawn)
        return size, None

    def _run_full_step(self) -> None:
        """A full step from the static buffers: replayed once captured; on CUDA the first `WARMUP_STEPS` run eagerly
        on a side stream (as torch.cuda.graphs asks: the optimizer's state and cuBLAS' workspaces exist by then),
        the next is captured, then replayed. Every step is a real step: no extra training."""
        if self.graph is not None:
            self.graph.replay()
        elif not self.cuda_graph:
            self._body(self.idx, self.dy, self.dx, self.flip, self.sums)
        elif self.eager_steps < WARMUP_STEPS:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._body(self.idx, self.dy, self.dx, self.flip, self.sums)
            torch.cuda.current_stream().wait_stream(stream)
            self.eager_steps += 1
        else:
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: Ray Train runs the loop in a thread of the worker; another thread's CUDA call during
            # the capture must not invalidate it
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # records, runs nothing
                self._body(self.idx, self.dy, self.dx, self.flip, self.sums)
            self.graph.replay()

    def train_epoch(self, plan, lr_at=None, watch=None) -> tuple[torch.Tensor, int]:
        """`worker.train_epoch`'s contract: device sums (loss, correct) and the image count; no host sync. `watch`:
        a PreemptionWatch, told after every step."""
        if plan.world != 1:  # the loss is this worker's mean: DDP's average over workers would need its weight
            raise ValueError("the graph-safe step trains one worker: DDP's all-reduce is not inside its graph")
        order = plan.order.to(self.device)
        self.model.train()
        self.sums.zero_()
        count = 0
        for step in range(plan.first_step, plan.stop_step):
            if lr_at is not None:
                self.lr.fill_(lr_at(plan.epoch, step))
            size, short = self._prepare(plan, step, order)
            if short:  # the epoch's last, smaller step: the same body on its own tensors, eagerly
                self._body(*short, self.sums)
            else:
                self._run_full_step()
            count += size
            if watch is not None:
                watch.after_step(plan, step, self.sums, count)
        return self.sums.clone(), count
