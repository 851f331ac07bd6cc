"""Correctness of the data-parallel split (gloo DDP, as Ray Train sets it up) and of the fast step on CPU."""


import math
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_resnet.augment import to_float
from distributed_resnet.inference import images_to_tensor
from distributed_resnet.worker import Augment, EpochPlan, train_epoch
from distributed_resnet.errors import UserError
from distributed_resnet.sharding import check_last_step_fits, epoch_order, split, step_slice, steps_per_epoch
from distributed_resnet.model import ResNet, param_groups

B, N, SEED = 32, 100, 7


def _data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


N_STEPS_DATA, STEP_BATCH = 100, 32  # steps of 32, 32, 32 and 4: uneven splits for 3 workers (11/11/10, 2/1/1)


# (workers, BatchNorm, flips, arithmetic): "fp64" (the math alone), "exact" (fp32 with --deterministic), "fp32"
RUNS = [(1, "global", "random", "fp64"), (2, "global", "random", "fp64"), (3, "global", "random", "fp64"),
        (4, "global", "random", "fp64"), (2, "local", "random", "fp64"), (1, "global", "alternate", "fp64"),
        (3, "global", "alternate", "fp64"),
        (1, "global", "random", "exact"), (2, "global", "random", "exact"), (3, "global", "random", "exact"),
        (4, "global", "random", "exact"), (1, "global", "random", "fp32"), (3, "global", "random", "fp32")]


def _train_worker(rank, store_dir):
    """Every run of RUNS, one after another, in one group of 4 gloo processes: a run of `world` workers uses ranks
    0..world-1. Each run is the project's train_epoch, a step at a time for two epochs: the global loss of every
    step, then training-mode logits of a fixed batch (each worker its share) and the BatchNorm buffers."""
    from distributed_resnet import deterministic
    from distributed_resnet.augment import alternating_flips
    from distributed_resnet.batchnorm import use_global_statistics
    from distributed_resnet.worker import DDP_OPTIONS, EpochPlan
    from distributed_resnet.sharding import split

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=4)
    groups = [dist.new_group(list(range(world))) for world, *_ in RUNS]  # every rank creates every group
    for (world, batchnorm, flips, arithmetic), group in zip(RUNS, groups):
        if rank >= world:
            continue
        torch.manual_seed(0)
        model = ResNet()
        exact_grads = None
        if arithmetic == "exact":  # fp32, every sum over the batch in fp64 (the loop's --deterministic)
            exact_grads, net = deterministic.enable(model, group if world > 1 else None), model
        else:
            if arithmetic == "fp64":  # the math of N workers against one, without fp32's rounding noise
                model = model.double()
            use_global_statistics(model, group if batchnorm == "global" and world > 1 else None)
            net = torch.nn.parallel.DistributedDataParallel(model, process_group=group, **DDP_OPTIONS) \
                if world > 1 else model
        opt = torch.optim.Adam(param_groups(model, 1e-4), lr=1e-3, eps=1e-7)
        images, labels = _data(N_STEPS_DATA)
        train = images_to_tensor(images, "cpu", False), torch.from_numpy(labels)
        first_flips = alternating_flips(N_STEPS_DATA, SEED, "cpu") if flips == "alternate" else None
        losses = []
        for epoch in range(2):
            for step in range(math.ceil(N_STEPS_DATA / STEP_BATCH)):
                plan = EpochPlan(N_STEPS_DATA, STEP_BATCH, world, rank, SEED, epoch, first_step=step,
                                 stop_step=step + 1)
                sums, count = train_epoch(net, opt, train, plan, Augment("bilinear", 0.1, first_flips), False,
                                          exact_grads=exact_grads)
                totals = torch.cat([sums, torch.tensor([float(count)], dtype=sums.dtype)])
                dist.all_reduce(totals, group=group)
                losses.append((totals[0] / totals[2]).item())
        fixed = to_float(torch.from_numpy(_data(40, seed=5)[0]).permute(0, 3, 1, 2).contiguous(),
                         next(model.parameters()).dtype)
        start, size = split(len(fixed), world, rank)
        if exact_grads is not None:
            exact_grads.begin_step(len(fixed))
        with torch.no_grad():
            logits = model.train()(fixed[start:start + size])
        gathered = [None] * world
        dist.all_gather_object(gathered, logits, group=group)
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        if rank == 0:
            torch.save({"losses": losses, "logits": torch.cat(gathered), "running_var": bn.running_var.clone()},
                       f"{store_dir}/{world}_{batchnorm}_{flips}_{arithmetic}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_any_number_of_workers_trains_the_one_worker_model(tmp_path):
    """Training mode, augmentation on, 8 steps (2 epochs) including uneven splits and a short last step:
    1, 2, 3 and 4 workers give the same global losses, training-mode logits and BatchNorm buffers, in fp64 to 1e-9
    (with alternating flips too, on 1 and 3 workers; the second epoch shows their flips are not the coin flips),
    and in fp32 with --deterministic bit for bit. Per-worker BatchNorm statistics (DDP's default, `--batchnorm
    local`) do not agree, nor does plain fp32 (its rounding depends on the split): the controls."""
    mp.spawn(_train_worker, args=(str(tmp_path),), nprocs=4, join=True)
    runs = {run: torch.load(tmp_path / "{}_{}_{}_{}.pt".format(*run)) for run in RUNS}
    for flips, worlds in (("random", (2, 3, 4)), ("alternate", (3,))):
        one = runs[1, "global", flips, "fp64"]
        for world in worlds:
            other = runs[world, "global", flips, "fp64"]
            np.testing.assert_allclose(other["losses"], one["losses"], rtol=1e-9)
            torch.testing.assert_close(other["logits"], one["logits"], rtol=1e-8, atol=1e-8)
            torch.testing.assert_close(other["running_var"], one["running_var"], rtol=1e-9, atol=1e-12)
    one = runs[1, "global", "random", "fp64"]
    assert np.abs(np.array(runs[1, "global", "alternate", "fp64"]["losses"][4:]) / np.array(one["losses"][4:]) - 1).max() > 1e-6
    local = runs[2, "local", "random", "fp64"]
    gap = np.abs(np.array(local["losses"]) / np.array(one["losses"]) - 1).max()
    assert gap > 1e-3, gap  # per-worker statistics: another model, by far more than the tolerance above
    # fp32 with --deterministic: 2, 3 and 4 workers compute the bits one worker computes.
    one = runs[1, "global", "random", "exact"]
    for world in (2, 3, 4):
        other = runs[world, "global", "random", "exact"]
        assert other["losses"] == one["losses"], world
        assert torch.equal(other["logits"], one["logits"]) and torch.equal(other["running_var"], one["running_var"])
    # The control: plain fp32 rounds each worker's sums on its own, and within 8 steps 3 workers drift from one by
    # far more than fp32's resolution (measured: 2.4e-3 in the last step's loss, 6e-3 in the logits).
    plain = np.array(runs[3, "global", "random", "fp32"]["losses"]) / np.array(runs[1, "global", "random", "fp32"]["losses"])
    assert np.abs(plain - 1).max() > 1e-4


def test_steps_cover_the_epoch_once_and_split_as_evenly_as_it_goes():
    assert [split(128, 3, r) for r in range(3)] == [(0, 43), (43, 43), (86, 42)]
    for n, batch, world in [(45000, 128, 2), (45000, 128, 3), (45000, 128, 8), (1001, 64, 5), (7, 4, 3)]:
        taken = []
        for step in range(steps_per_epoch(n, batch)):
            parts = [step_slice(n, batch, step, world, r) for r in range(world)]
            sizes = [size for _, size, _ in parts]
            assert max(sizes) - min(sizes) <= 1 and sum(sizes) == parts[0][2]
            taken += [i for start, size, _ in parts for i in range(start, start + size)]
        assert taken == list(range(n))  # every image once, in the epoch's order, whatever the worker count
    a, b = epoch_order(1000, 0, 1), epoch_order(1000, 0, 2)
    assert not np.array_equal(a, b) and np.array_equal(a, epoch_order(1000, 0, 1))  # a new seeded order per epoch
    check_last_step_fits(45000, 128, 72)  # 45,000 = 351 x 128 + 72: up to 72 workers get an image of the last step
    with pytest.raises(UserError, match="the last batch of an epoch has 72 image"):
        check_last_step_fits(45000, 128, 73)


def _run_steps(fast: bool, steps: int = 4):
    torch.manual_seed(0)
    model = ResNet()
    if fast:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(param_groups(model, 1e-4), lr=1e-3, eps=1e-7)
    images, labels = _data()
    train = images_to_tensor(images, "cpu", fast), torch.from_numpy(labels)
    losses = []
    for s in range(steps):
        plan = EpochPlan(N, 16, 1, 0, SEED, 0, first_step=s, stop_step=s + 1)
        sums, count = train_epoch(model, opt, train, plan, Augment("bilinear"), fast)
        losses.append(sums[0].item() / count)
    return losses, model


def test_fast_step_matches_eager_on_cpu():
    """bf16 autocast + channels_last (the fast path, on CPUs with native bf16 and on CUDA) tracks the fp32 eager step."""
    eager_losses, eager = _run_steps(fast=False)
    fast_losses, fast = _run_steps(fast=True)
    np.testing.assert_allclose(fast_losses, eager_losses, rtol=0.03)
    # Same function after the steps: eval-mode logits on fresh images agree (weights one by one do not, since
    # Adam turns the rounding noise of the near-zero gradients of conv biases under BatchNorm into full steps).
    x = to_float(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(9)))
    with torch.no_grad():
        out_fast, out_eager = fast.eval()(x.contiguous(memory_format=torch.channels_last)), eager.eval()(x)
    rel = ((out_fast - out_eager).norm() / out_eager.norm()).item()
    assert rel < 0.05, rel


def test_ddp_gradients_stay_views_of_the_all_reduce_buckets(tmp_path):
    """The loop's DDP options are current ones, and with them train_epoch keeps every gradient the same view of DDP's
    buckets from step to step (it zeroes them in place: torch's DDP docstring says set_to_none defeats
    gradient_as_bucket_view, at the cost of an allocation and a copy per gradient and step)."""
    from distributed_resnet.worker import DDP_OPTIONS

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = ResNet()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no deprecated option (broadcast_buffers is, since torch 2.13)
            ddp = torch.nn.parallel.DistributedDataParallel(model, **DDP_OPTIONS)
        opt = torch.optim.Adam(param_groups(model, 1e-4), lr=1e-3)
        images, labels = _data()
        train = images_to_tensor(images, "cpu", False), torch.from_numpy(labels)
        train_epoch(ddp, opt, train, EpochPlan(N, 25, 1, 0, SEED, 0, stop_step=2), Augment("pixel"), False)
        views = [p.grad for p in model.parameters()]
        assert all(g is not None and g._is_view() for g in views)
        train_epoch(ddp, opt, train, EpochPlan(N, 25, 1, 0, SEED, 1, stop_step=2), Augment("pixel"), False)
        assert all(p.grad is g for p, g in zip(model.parameters(), views))
    finally:
        dist.destroy_process_group()
