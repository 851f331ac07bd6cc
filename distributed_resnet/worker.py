"""The per-worker training loop that Ray Train runs on every worker (or in the driver with --num-workers 0).

Reads top to bottom in the order it runs: data onto the device, model and optimizer, restore, then one
epoch at a time: train on this worker's shard, evaluate the whole val and test sets across workers, step
the LR policy, save a checkpoint and report. Everything it needs arrives in one dict (`loop_config`), the
arrays as Ray object references, so workers never read files.
"""

from __future__ import annotations

import functools
import math
import tempfile
import time
import warnings
from typing import NamedTuple

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import deterministic
from .augment import alternating_flips, resize, shift_images, step_draws, to_float
from .batchnorm import use_global_statistics
from .compiling import CompiledOrEager, unwrapped
from .config import TrainConfig
from .device import local_device, param_dtype, use_bf16
from .graphed import GraphSafeStep
from .inference import images_to_tensor, predict
from .model import ResNet, count_parameters
from .optim import build_optimizer, training_loss
from .schedule import lr_policy
from .sharding import check_last_step_fits, epoch_order, flip_seed, step_slice, steps_per_epoch


# No buffer sync on every forward (global BatchNorm keeps them equal; per-worker BatchNorm broadcasts rank 0's once
# per epoch, below); gradients are all-reduced in place, in the buckets they live in (which
# `zero_grad(set_to_none=False)` keeps: see train_epoch).
DDP_OPTIONS = {"forward_sync_buffers": False, "gradient_as_bucket_view": True}


def train_loop_per_worker(loop_config: dict) -> dict:
    cfg = TrainConfig(**loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    local_mode = loop_config.get("local_run_dir") is not None
    progress = loop_config.get("progress")
    device = local_device(cfg.use_gpu) if local_mode else ray.train.torch.get_device()
    fast = use_bf16(cfg.precision, device)  # bf16 autocast + channels_last + fused Adam
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # fixed shapes: let cuDNN pick its fastest kernels once (--deterministic: the same kernels every time, and
        # fp32, not TF32; whether cuDNN's kernels are batch-size invariant is not measured: no GPU so far)
        torch.backends.cudnn.benchmark = not cfg.deterministic
        if cfg.deterministic:
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    elif not local_mode:
        torch.set_num_threads(cfg.cpus_per_worker)

    # Data: uint8 on the device, once. NHWC arrays permuted to NCHW shape are channels_last in memory.
    arrays = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in loop_config["data"].items()}
    splits = {name: _to_device(arrays[f"{name}_images"], arrays[f"{name}_labels"], device, fast)
              for name in ("train", "val", "test")}
    val_is_test = loop_config.get("val_is_test", False)

    # Model, optimizer, LR policy: restored from the newest checkpoint after a failure or a resumed run.
    torch.manual_seed(cfg.seed)  # the initial weights follow --seed
    model = ResNet(cfg.depth, cfg.version, padding=cfg.padding, bn_momentum=cfg.bn_momentum)
    model = model.to(device, param_dtype(cfg.precision))
    if fast:
        model = model.to(memory_format=torch.channels_last)
    graph_safe = _uses_graph_safe_step(cfg, device, world)
    fused = fast or graph_safe  # the graph-safe step needs the fused optimizers (they take the LR as a tensor)
    optimizer = build_optimizer(model, cfg, fused=fused)
    n_train = len(splits["train"][1])
    policy = lr_policy(cfg, steps_per_epoch(n_train, cfg.global_batch_size))
    start_epoch, history, restarts, resume = 0, [], [], None
    restored = _checkpoint_to_restore(loop_config, rank, world)
    if restored is not None:
        with restored.as_directory() as folder:
            state = ckpt.load(folder)  # on the CPU: load_state_dict places each tensor (Adam's step stays on the host)
        ckpt.check_compatible(state["meta"], cfg.depth, cfg.version, restored.path, cfg.padding)
        model.load_state_dict(state["model"])
        ckpt.restore_optimizer(optimizer, state["optimizer"], fused=fused)
        policy.load_state_dict(state["lr_policy"])
        start_epoch, history = state["epoch"], state["history"]
        restarts = state["restarts"] + [start_epoch]
        resume = state.get("mid_epoch")  # a checkpoint saved on a preemption notice, part-way through an epoch
        if rank == 0 and progress is not None and (resume or state.get("workers", world) != world):
            where = f"epoch {start_epoch + 1} step {resume['step']}" if resume else f"epoch {start_epoch + 1}"
            _tell(progress, {"note": f"continuing from {where} on {world} worker{'s' if world != 1 else ''} "
                                  f"(was {state.get('workers', '?')})"})
    elif loop_config.get("init_state") is not None:  # --init-weights, read and checked by the driver
        init = loop_config["init_state"]
        model.load_state_dict(ray.get(init) if isinstance(init, ray.ObjectRef) else init)
    global_bn = cfg.batchnorm == "global" and world > 1
    exact_grads = None
    if cfg.deterministic:  # sums over the batch that do not depend on the split (deterministic.py), in place of DDP
        exact_grads = deterministic.enable(model, dist.group.WORLD if world > 1 else None)
        _broadcast_state(model, world)
        net = model
    else:
        use_global_statistics(model, dist.group.WORLD if global_bn else None)
        net = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=DDP_OPTIONS) \
            if world > 1 else model

    if cfg.compile:  # around DDP: Dynamo splits the graph at the buckets' all-reduces (its DDPOptimizer)
        def warn(text: str) -> None:
            if rank == 0 and progress is not None:
                _tell(progress, {"note": text})
            elif rank == 0:
                warnings.warn(text)

        net = CompiledOrEager(net, warn)
    keeper = ckpt.LocalKeeper(loop_config["local_run_dir"], cfg.num_to_keep) if local_mode else None
    check_last_step_fits(n_train, cfg.global_batch_size, world)
    stopped = None
    _state = functools.partial(_checkpoint_state, cfg, model, optimizer, policy, history, restarts, world)
    if history and start_epoch >= cfg.epochs:
        # Restored from the last epoch's checkpoint (written just before the run stopped): nothing is left to
        # train, so report that epoch again for Ray Train's result and Tune's trial (every rank reports).
        ray.train.report(history[-1])
    first_flips = alternating_flips(n_train, flip_seed(cfg.seed), device) if cfg.flip == "alternate" else None
    augment = Augment(cfg.shift, cfg.max_shift, first_flips) if cfg.augment else None
    graph_step = None  # the graph-safe step of this epoch's training side (--progressive-resize): its own graph
    for epoch in range(start_epoch, cfg.epochs):
        lr = policy.lr(epoch)
        t0 = time.perf_counter()
        first_step, carried = (resume["step"], resume) if resume and epoch == start_epoch else (0, None)
        set_lr(optimizer, lr)  # a per-step policy sets it again at every step
        carried_seconds = carried["train_seconds"] if carried else 0.0
        plan = EpochPlan(n_train, cfg.global_batch_size, world, rank, cfg.seed, epoch, first_step=first_step)

        def on_notice(step: int, sums: torch.Tensor, count: int) -> None:
            """A preemption notice: save the epoch so far (the steps done, their loss sums) and train on."""
            done = _all_reduce_totals(sums, count, world, carried)
            mid = {"step": step, "loss_sum": done[0], "correct": done[1], "count": done[2],
                   "train_seconds": carried_seconds + time.perf_counter() - t0}
            marks = {"epoch": epoch, "step": step, "val_accuracy": float("nan"), "preemption_checkpoint": True}
            _save_and_report(marks, _state(epoch, mid), rank, ckpt.dir_name(epoch, step), keeper)

        preempt = PreemptionWatch(on_notice, loop_config.get("preemption_check_steps", 0), local_mode)
        side = cfg.train_size(epoch)
        lr_at = policy.lr if policy.per_step else None
        if graph_safe:
            if graph_step is None or graph_step.side != side:  # a new side: the last side's graph is done with
                graph_step = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                graph_step = GraphSafeStep(net, optimizer, *splits["train"], cfg.global_batch_size, augment, fast,
                                           cfg.label_smoothing, side)
            train_sums = graph_step.train_epoch(plan, lr_at, preempt)
        else:
            train_sums = train_epoch(net, optimizer, splits["train"], plan, augment, fast, preempt, lr_at,
                                     cfg.label_smoothing, exact_grads, side)
        _synchronize(device)
        train_seconds = time.perf_counter() - t0 + carried_seconds
        train_loss, train_acc = _means(_all_reduce_totals(*train_sums, world, carried))
        if not global_bn:  # per-worker statistics differ: evaluate everywhere with rank 0's
            _broadcast_buffers(model, world)
        val_loss, val_acc = _all_reduce_means(evaluate(model, *splits["val"], cfg.eval_batch_size, rank, world), world)
        if val_is_test:
            test_loss, test_acc = val_loss, val_acc
        elif not cfg.report_test or ((epoch + 1) % cfg.test_every and epoch + 1 < cfg.epochs):
            test_loss = test_acc = None
        else:
            test_loss, test_acc = _all_reduce_means(evaluate(model, *splits["test"], cfg.eval_batch_size, rank, world), world)
        cut = policy.end_epoch(epoch, val_loss)
        metrics = {
            "epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_accuracy": train_acc,
            "val_loss": val_loss, "val_accuracy": val_acc, "test_loss": test_loss, "test_accuracy": test_acc,
            "images_per_second": n_train / train_seconds, "train_seconds": train_seconds,
            "epoch_seconds": time.perf_counter() - t0 + carried_seconds, "ended_at": time.time(), "lr_cut": cut,
            "workers": world, "train_size": side or splits["train"][0].shape[-1],
            **({"resumed_at_step": first_step} if first_step else {}),
        }
        history.append(metrics)
        if not math.isfinite(train_loss) or not math.isfinite(val_loss):
            stopped = (f"the loss became {train_loss if not math.isfinite(train_loss) else val_loss} at epoch {epoch + 1}; "
                       f"stopped, the checkpoints of earlier epochs are kept (try a lower --lr)")
            if progress is not None and rank == 0:
                _tell(progress, {"stopped": stopped, **metrics})
            break
        _save_and_report(metrics, _state(epoch + 1, None, metrics), rank, ckpt.dir_name(epoch + 1), keeper)
        if progress is not None and rank == 0:
            _tell(progress, metrics)
    return {"history": history, "restarts": restarts, "stopped": stopped, "device": str(device),
            "worker_nodes": _gather_node_ids(world),
            "parameters": count_parameters(model)}


def _uses_graph_safe_step(cfg: TrainConfig, device, world: int) -> bool:
    """`--cuda-graph on`, or `auto` on a single CUDA worker with neither --deterministic nor --compile."""
    if cfg.cuda_graph == "auto":
        return device.type == "cuda" and world == 1 and not (cfg.deterministic or cfg.compile)
    return cfg.cuda_graph == "on"


def _tell(progress, message: dict) -> None:
    """Hand a line to the driver; never let a lost line (its queue gone with a node) stop the training."""
    try:
        progress.put(message)
    except Exception as e:  # noqa: BLE001 - the driver's progress queue is best effort
        warnings.warn(f"progress line lost: {type(e).__name__}")


def _checkpoint_state(cfg, model, optimizer, policy, history, restarts, world, epoch: int, mid_epoch: dict | None,
                      metrics: dict | None = None) -> dict:
    """Everything a restored run needs. `epoch`: the epochs finished; `mid_epoch`: how far the next one got (a
    preemption checkpoint). The data order and augmentation are functions of (seed, epoch, step), so these numbers
    are the whole RNG state."""
    meta = {"depth": cfg.depth, "version": cfg.version, "padding": cfg.padding, "batchnorm": cfg.batchnorm,
            "epoch": epoch, "metrics": metrics, "parameters": count_parameters(model), "config": cfg.to_dict(),
            **({"mid_epoch_step": mid_epoch["step"]} if mid_epoch else {})}
    saved = optimizer.state_dict()  # the LR as a number and no capture flag, whichever step trained it
    saved["param_groups"] = [{**g, "lr": float(g["lr"]), **({"capturable": False} if "capturable" in g else {})}
                             for g in saved["param_groups"]]
    return {"model": model.state_dict(), "optimizer": saved, "lr_policy": policy.state_dict(),
            "epoch": epoch, "history": list(history), "restarts": restarts, "meta": meta, "workers": world,
            "mid_epoch": mid_epoch, "rng": {"seed": cfg.seed, "next_epoch": epoch}}


class PreemptionWatch:
    """Asks Ray Train every `every` steps whether a node of this run is being preempted (a spot reclaim, a drain),
    and on the first notice calls `on_notice(next_step, sums, count)` to save a checkpoint. `get_preemption_info`
    is a barrier: every worker asks at the same steps. Off (every=0) in local mode and in Tune trials."""

    def __init__(self, on_notice, every: int, local_mode: bool):
        self.on_notice, self.every = on_notice, 0 if local_mode else every
        self.noticed = False

    def after_step(self, plan: "EpochPlan", step: int, sums: torch.Tensor, count: int) -> None:
        done = plan.epoch * plan.steps + step + 1  # steps of the whole run: epochs shorter than `every` are checked too
        if not self.every or self.noticed or done % self.every:
            return
        if ray.train.get_preemption_info() is not None:
            self.noticed = True
            self.on_notice(step + 1, sums, count)


def _checkpoint_to_restore(loop_config: dict, rank: int, world: int):
    """The newest of Ray's latest registered checkpoint and the newest complete one in the run folder on disk.

    On local storage the folder can be ahead of Ray's record: a run stopped (Ctrl-C, a killed driver, a killed
    worker) between a checkpoint's upload and the controller registering it; this also finds the checkpoint a
    `--resume` continues from. Without a run folder (remote storage, PBT segments) `resume_from` names one.
    Rank 0 decides, and every rank restores the same one.
    """
    registered = ray.train.get_checkpoint()  # the same on every rank
    run_dir = loop_config.get("run_dir") or loop_config.get("local_run_dir")
    on_disk = [None]
    if rank == 0:
        found = (ckpt.latest_in(run_dir) if run_dir else None) or loop_config.get("resume_from")
        newer = found and ckpt.newest(registered, ray.train.Checkpoint.from_directory(str(found))) is not registered
        on_disk = [str(found) if newer else None]
    if world > 1:
        dist.broadcast_object_list(on_disk, src=0)
    return ray.train.Checkpoint.from_directory(on_disk[0]) if on_disk[0] else registered


def set_lr(optimizer, lr: float) -> None:
    """Every group's LR; the graph-safe step's LR tensor is filled in place (its graph reads that address)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class Augment(NamedTuple):
    """Flips plus shifts of `shift` kind ("bilinear" or "pixel") of up to `max_shift` of the side. `first_flips`:
    each training image's flip in the first epoch, alternating from there (`--flip alternate`); None: coin flips."""

    shift: str = "bilinear"
    max_shift: float = 0.1
    first_flips: torch.Tensor | None = None


class EpochPlan:
    """This worker's share of one epoch (see `sharding`): the epoch's order on the device, and per step the slice of
    it and the augmentation draws of the whole global batch, whatever the number of workers."""

    def __init__(self, n: int, batch: int, world: int, rank: int, seed: int, epoch: int, first_step: int = 0,
                 stop_step: int | None = None):
        self.n, self.batch, self.world, self.rank, self.seed, self.epoch = n, batch, world, rank, seed, epoch
        self.order = torch.from_numpy(epoch_order(n, seed, epoch))
        self.steps = steps_per_epoch(n, batch)
        self.first_step, self.stop_step = first_step, self.steps if stop_step is None else stop_step

    def step(self, step: int) -> tuple[int, int, int]:
        """(start in the order, this worker's images, the step's images)."""
        return step_slice(self.n, self.batch, step, self.world, self.rank)


def train_epoch(net, optimizer, train, plan: EpochPlan, augment: Augment | None, fast, watch=None, lr_at=None,
                smoothing: float = 0.0, exact_grads: deterministic.ExactGradients | None = None,
                side: int | None = None) -> tuple[torch.Tensor, int]:
    """One pass over this worker's share of the epoch: device sums (loss, correct) and the image count; no host
    sync inside. `augment`: flips and shifts, None for none. `watch`: a PreemptionWatch, told after every step.
    `lr_at(epoch, step)`: a per-step LR policy (one cycle), else the LR stays as set. `smoothing`: label smoothing.
    `exact_grads`: `--deterministic` (`deterministic.py`): `net` is the bare model, its gradients summed exactly.
    `side`: the side the augmented images are resized to (`--progressive-resize`), None for full size."""
    images, labels = train
    device = images.device
    dtype = next(net.parameters()).dtype  # fp32; fp64 in the tests that check the math of N workers exactly
    order = plan.order.to(device)
    gen = torch.Generator(device=device)
    _, _, h, w = images.shape
    # Under DDP with gradient_as_bucket_view the gradients are views of the all-reduce buckets: zeroing them in
    # place keeps them so; set_to_none would drop the views, and DDP would allocate and copy again every step.
    set_to_none = not isinstance(unwrapped(net), torch.nn.parallel.DistributedDataParallel)
    net.train()
    sums, count = torch.zeros(2, device=device, dtype=torch.float64), 0
    for step in range(plan.first_step, plan.stop_step):
        if lr_at is not None:
            set_lr(optimizer, lr_at(plan.epoch, step))
        start, size, step_size = plan.step(step)
        idx = order[start:start + size]
        x, y = to_float(images[idx], dtype), labels[idx]
        if augment:
            x = shift_images(x, *step_draws(augment, plan, step, idx, start, size, step_size, h, w, gen))
        x = resize(x, side)
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
        if exact_grads is not None:
            exact_grads.begin_step(step_size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
            logits = net(x)
        if exact_grads is None:
            loss = training_loss(logits, y, smoothing)
            optimizer.zero_grad(set_to_none=set_to_none)
            # Weighted so that DDP's average over the workers is the mean over the step's global batch.
            (loss * (plan.world * size / step_size)).backward()
            loss_sum = loss.double() * size
        else:  # each image's loss gets the gradient 1 / step_size, whatever N; exact_grads makes every sum
            losses = training_loss(logits, y, smoothing, reduction="none")
            (losses.sum() / step_size).backward()
            exact_grads.reduce()
            loss_sum = losses.double().sum()
        optimizer.step()
        with torch.no_grad():
            sums += torch.stack([loss_sum.detach(), (logits.argmax(1) == y).sum().double()])
        count += size
        if watch is not None:
            watch.after_step(plan, step, sums, count)
    return sums, count


def evaluate(model, images, labels, batch, rank=0, world=1) -> torch.Tensor:
    """(loss sum, correct) and count over this worker's contiguous slice; all-reduced, they cover the whole set."""
    n = len(labels)
    start, stop = n * rank // world, n * (rank + 1) // world
    logits = predict(model, images, batch, start, stop)
    y = labels[start:stop]
    loss = F.cross_entropy(logits, y, reduction="none").double().sum()  # per image, summed in fp64
    return torch.stack([loss, (logits.argmax(1) == y).sum().double()]), stop - start


def _to_device(images: np.ndarray, labels: np.ndarray, device, fast: bool):
    return images_to_tensor(images, device, fast), torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)


def _save_and_report(metrics, state, rank, name, keeper) -> None:
    """Rank 0 writes the checkpoint; every rank reports (Ray requires the same number of reports everywhere)."""
    if keeper is not None:  # local mode: write straight into the run folder
        folder = keeper.run_dir / name
        ckpt.save(folder, state)
        keeper.prune()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
        return
    with tempfile.TemporaryDirectory(prefix="resnet_ckpt_") as tmp:
        checkpoint = None
        if rank == 0:
            ckpt.save(tmp, state)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def _all_reduce_totals(sums: torch.Tensor, count: int, world: int, carried: dict | None = None) -> list[float]:
    """[loss sum, correct, count] over all workers (one host sync), plus what a mid-epoch checkpoint carried."""
    totals = torch.cat([sums, torch.tensor([float(count)], dtype=sums.dtype).to(sums.device)])
    if world > 1:
        dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    if carried:
        loss_sum, correct, count = loss_sum + carried["loss_sum"], correct + carried["correct"], count + carried["count"]
    return [loss_sum, correct, count]


def _means(totals: list[float]) -> tuple[float, float]:
    loss_sum, correct, count = totals
    return loss_sum / count, correct / count


def _all_reduce_means(sums_and_count: tuple[torch.Tensor, int], world: int) -> tuple[float, float]:
    """Mean loss and accuracy over all workers from per-worker (loss sum, correct) and counts."""
    return _means(_all_reduce_totals(*sums_and_count, world))


def _broadcast_buffers(model, world: int) -> None:
    if world > 1:
        for buf in model.buffers():
            dist.broadcast(buf, 0)


def _broadcast_state(model, world: int) -> None:
    """Rank 0's parameters and buffers everywhere (what DDP does when it wraps a model)."""
    if world > 1:
        with torch.no_grad():
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, 0)


def _gather_node_ids(world: int) -> list[str]:
    """The Ray node of every rank, so a run can show where its workers ran."""
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    if world == 1:
        return [node]
    nodes = [None] * world
    dist.all_gather_object(nodes, node)
    return nodes


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
