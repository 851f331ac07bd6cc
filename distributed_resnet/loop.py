"""The per-worker training loop that Ray Train runs on every worker (or in the driver with --num-workers 0).

Reads top to bottom in the order it runs: data onto the device, model and optimizer, restore, then one
epoch at a time: train on this worker's shard, evaluate the whole val and test sets across workers, step
the LR policy, save a checkpoint and report. Everything it needs arrives in one dict (`loop_config`), the
arrays as Ray object references, so workers never read files.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint as ckpt
from .augment import random_flip_shift, to_float
from .config import TrainConfig
from .device import exact_fp32, local_device, use_bf16
from .model import NUM_CLASSES, ResNet, count_parameters, param_groups
from .schedule import LRPolicy


# Buffers are broadcast once per epoch (below), not on every forward; gradients are all-reduced in place, in the
# buckets they live in (which `zero_grad(set_to_none=False)` keeps: see train_epoch).
DDP_OPTIONS = {"forward_sync_buffers": False, "gradient_as_bucket_view": True}


def train_loop_per_worker(loop_config: dict) -> dict:
    cfg = TrainConfig(**loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    local_mode = loop_config.get("local_run_dir") is not None
    device = local_device(cfg.use_gpu) if local_mode else ray.train.torch.get_device()
    fast = use_bf16(cfg.precision, device)  # bf16 autocast + channels_last + fused Adam
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    elif not local_mode:
        torch.set_num_threads(cfg.cpus_per_worker)

    # Data: uint8 on the device, once. NHWC arrays permuted to NCHW shape are channels_last in memory.
    arrays = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in loop_config["data"].items()}
    splits = {name: _to_device(arrays[f"{name}_images"], arrays[f"{name}_labels"], device, fast)
              for name in ("train", "val", "test")}
    val_is_test = loop_config.get("val_is_test", False)

    # Model, optimizer, LR policy: restored from the newest checkpoint after a failure or a resumed run.
    torch.manual_seed(cfg.seed)  # the initial weights follow --seed
    model = ResNet(cfg.depth, cfg.version, padding=cfg.padding).to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(param_groups(model, cfg.weight_decay), lr=cfg.lr, eps=cfg.adam_eps,
                                 fused=fast or None)
    policy = LRPolicy.from_config(cfg)
    start_epoch, history, restarts = 0, [], []
    restored = _checkpoint_to_restore(loop_config, rank, world)
    if restored is not None:
        with restored.as_directory() as folder:
            state = ckpt.load(folder)  # on the CPU: load_state_dict places each tensor (Adam's step stays on the host)
        ckpt.check_compatible(state["meta"], cfg.depth, cfg.version, restored.path, cfg.padding)
        model.load_state_dict(state["model"])
        ckpt.restore_optimizer(optimizer, state["optimizer"], fused=fast)
        policy.load_state_dict(state["lr_policy"])
        start_epoch, history = state["epoch"], state["history"]
        restarts = state["restarts"] + [start_epoch]
    elif loop_config.get("init_state") is not None:  # --init-weights, read and checked by the driver
        init = loop_config["init_state"]
        model.load_state_dict(ray.get(init) if isinstance(init, ray.ObjectRef) else init)
    net = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=DDP_OPTIONS) \
        if world > 1 else model

    keeper = ckpt.LocalKeeper(loop_config["local_run_dir"], cfg.num_to_keep) if local_mode else None
    progress = loop_config.get("progress")
    n_train = len(splits["train"][1])
    batch = cfg.global_batch_size // world
    steps = math.ceil(n_train / cfg.global_batch_size)
    stopped = None
    if history and start_epoch >= cfg.epochs:
        # Restored from the last epoch's checkpoint (written just before the run stopped): nothing is left to
        # train, so report that epoch again for Ray Train's result and Tune's trial (every rank reports).
        ray.train.report(history[-1])
    for epoch in range(start_epoch, cfg.epochs):
        lr = policy.lr(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        order = torch.from_numpy(shard_order(n_train, world, rank, cfg.seed, epoch)).to(device)
        gen = torch.Generator(device=device).manual_seed(_seed(cfg.seed, epoch, rank))
        train_sums = train_epoch(net, optimizer, splits["train"], order, batch, steps,
                                 cfg.shift if cfg.augment else None, fast, gen)
        _synchronize(device)
        train_seconds = time.perf_counter() - t0
        train_loss, train_acc = _all_reduce_means(train_sums, world)
        _broadcast_buffers(model, world)  # evaluate everywhere with rank 0's BatchNorm statistics
        val_loss, val_acc = _all_reduce_means(evaluate(model, *splits["val"], cfg.eval_batch_size, rank, world), world)
        if val_is_test:
            test_loss, test_acc = val_loss, val_acc
        elif not cfg.report_test:
            test_loss = test_acc = None
        else:
            test_loss, test_acc = _all_reduce_means(evaluate(model, *splits["test"], cfg.eval_batch_size, rank, world), world)
        cut = policy.end_epoch(epoch, val_loss)
        metrics = {
            "epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_accuracy": train_acc,
            "val_loss": val_loss, "val_accuracy": val_acc, "test_loss": test_loss, "test_accuracy": test_acc,
            "images_per_second": n_train / train_seconds, "train_seconds": train_seconds,
            "epoch_seconds": time.perf_counter() - t0, "lr_cut": cut,
        }
        history.append(metrics)
        if not math.isfinite(train_loss) or not math.isfinite(val_loss):
            stopped = (f"the loss became {train_loss if not math.isfinite(train_loss) else val_loss} at epoch {epoch + 1}; "
                       f"stopped, the checkpoints of earlier epochs are kept (try a lower --lr)")
            if progress is not None and rank == 0:
                progress.put({"stopped": stopped, **metrics})
            break
        meta = {"depth": cfg.depth, "version": cfg.version, "padding": cfg.padding, "epoch": epoch + 1, "metrics": metrics,
                "parameters": count_parameters(model), "config": cfg.to_dict()}
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr_policy": policy.state_dict(),
                 "epoch": epoch + 1, "history": history, "restarts": restarts, "meta": meta,
                 # The augmentation and shuffling RNGs are re-seeded from (seed, epoch, rank) every epoch,
                 # so these two numbers are the whole RNG state a restored run needs.
                 "rng": {"seed": cfg.seed, "next_epoch": epoch + 1}}
        _save_and_report(metrics, state, rank, epoch + 1, keeper)
        if progress is not None and rank == 0:
            progress.put(metrics)
    return {"history": history, "restarts": restarts, "stopped": stopped, "device": str(device),
            "worker_nodes": _gather_node_ids(world),
            "parameters": count_parameters(model)}


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


def shard_order(n: int, world: int, rank: int, seed: int, epoch: int) -> np.ndarray:
    """This worker's training indices for one epoch, like torch's DistributedSampler.

    One seeded permutation per epoch, padded by wrap-around to a multiple of `world`; worker r takes every
    `world`-th index from r. Every worker gets the same count, so each step's batches are equal in size and
    DDP's gradient average equals the mean over the global batch; step s of the workers together covers
    `perm[s*B:(s+1)*B]`, the same images one worker would take with the same global batch B.
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    pad = (-n) % world
    if pad:
        perm = np.concatenate([perm, perm[:pad]])
    return perm[rank::world]


def train_epoch(net, optimizer, train, order, batch, steps, shift, fast, gen) -> tuple[torch.Tensor, int]:
    """One pass over this worker's shard: device sums (loss, correct) and the image count; no host sync inside.

    `shift`: the augmentation ("bilinear" or "pixel", with random flips), None for none.
    """
    images, labels = train
    # Under DDP with gradient_as_bucket_view the gradients are views of the all-reduce buckets: zeroing them in
    # place keeps them so; set_to_none would drop the views, and DDP would allocate and copy again every step.
    set_to_none = not isinstance(net, torch.nn.parallel.DistributedDataParallel)
    net.train()
    sums, count = torch.zeros(2, device=images.device, dtype=torch.float64), 0
    for step in range(steps):
        idx = order[step * batch:(step + 1) * batch]
        x, y = to_float(images[idx]), labels[idx]
        if shift:
            x = random_flip_shift(x, shift, generator=gen)
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=fast):
            logits = net(x)
        # Softmax + categorical cross-entropy on one-hot targets, as the reference compiles its model.
        loss = F.cross_entropy(logits.float(), F.one_hot(y, NUM_CLASSES).float())
        optimizer.zero_grad(set_to_none=set_to_none)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            sums += torch.stack([loss.double() * len(y), (logits.argmax(1) == y).sum().double()])
        count += len(y)
    return sums, count


@torch.no_grad()
def predict(model, images: torch.Tensor, batch: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Logits for images[start:stop], in eval mode and fp32 (bf16 rounding in the val loss would be of the order
    of ReduceLROnPlateau's min_delta), a batch at a time."""
    model.eval()
    stop = len(images) if stop is None else stop
    with exact_fp32():
        out = [model(to_float(images[i:min(i + batch, stop)])) for i in range(start, stop, batch)]
    return torch.cat(out) if out else torch.zeros(0, NUM_CLASSES, device=images.device)


def evaluate(model, images, labels, batch, rank=0, world=1) -> torch.Tensor:
    """(loss sum, correct) and count over this worker's contiguous slice; all-reduced, they cover the whole set."""
    n = len(labels)
    start, stop = n * rank // world, n * (rank + 1) // world
    logits = predict(model, images, batch, start, stop)
    y = labels[start:stop]
    loss = F.cross_entropy(logits, y, reduction="sum").double()
    return torch.stack([loss, (logits.argmax(1) == y).sum().double()]), stop - start


def images_to_tensor(images: np.ndarray, device, channels_last: bool) -> torch.Tensor:
    """N x H x W x C uint8 -> N x C x H x W uint8 on `device` (channels_last keeps the NHWC bytes as they are)."""
    with warnings.catch_warnings():  # arrays from the object store or the cache are read-only; nothing writes them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2)
    return t if channels_last else t.contiguous()


def _to_device(images: np.ndarray, labels: np.ndarray, device, fast: bool):
    return images_to_tensor(images, device, fast), torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)


def _save_and_report(metrics, state, rank, epoch, keeper) -> None:
    """Rank 0 writes the checkpoint; every rank reports (Ray requires the same number of reports everywhere)."""
    name = ckpt.dir_name(epoch)
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


def _all_reduce_means(sums_and_count: tuple[torch.Tensor, int], world: int) -> tuple[float, float]:
    """Mean loss and accuracy over all workers from per-worker (loss sum, correct) and counts."""
    sums, count = sums_and_count
    totals = torch.cat([sums, torch.tensor([float(count)], dtype=sums.dtype).to(sums.device)])
    if world > 1:
        dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    return loss_sum / count, correct / count


def _broadcast_buffers(model, world: int) -> None:
    if world > 1:
        for buf in model.buffers():
            dist.broadcast(buf, 0)


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


def _seed(seed: int, epoch: int, rank: int) -> int:
    """Augmentation RNG seed: a function of (seed, epoch, rank), so a restored run draws what it would have."""
    return int(np.random.default_rng([seed, epoch, rank, 1]).integers(2**62))
