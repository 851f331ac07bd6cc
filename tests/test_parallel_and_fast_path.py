"""Correctness of the data-parallel split (gloo DDP, as Ray Train sets it up) and of the fast step on CPU."""


import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from distributed_resnet.augment import to_float
from distributed_resnet.loop import images_to_tensor, shard_order, train_epoch
from distributed_resnet.model import NUM_CLASSES, ResNet, param_groups

B, N, SEED = 32, 100, 7


def _data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, N)


def _first_step_grads(model, images, labels, idx):
    x = to_float(images_to_tensor(images[idx], "cpu", False))
    loss = F.cross_entropy(model(x), F.one_hot(torch.from_numpy(labels[idx]), NUM_CLASSES).float())
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _worker(rank, world, store_dir, out):
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = ResNet().eval()  # eval-mode BN: a sample's output does not depend on its batch-mates
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    images, labels = _data()
    idx = shard_order(N, world, rank, SEED, 0)[: B // world]
    grads = _first_step_grads(ddp, images, labels, idx)
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()


def test_two_workers_global_batch_equals_one_worker(tmp_path):
    """DDP over 2 gloo workers, each with half of global batch B, gives the gradients of 1 worker with batch B."""
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(2, str(tmp_path), out), nprocs=2, join=True)
    torch.manual_seed(0)
    model = ResNet().eval()
    images, labels = _data()
    single = _first_step_grads(model, images, labels, shard_order(N, 1, 0, SEED, 0)[:B])
    for g2, g1 in zip(torch.load(out), single):
        torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)


def test_shards_cover_the_epoch_once_with_equal_sizes():
    for n, world in [(45000, 2), (45000, 8), (1001, 4), (7, 3)]:
        shards = [shard_order(n, world, r, 0, 5) for r in range(world)]
        assert len({len(s) for s in shards}) == 1  # equal steps and batch sizes on every worker
        covered = np.concatenate(shards)
        assert set(covered.tolist()) == set(range(n)) and len(covered) - n == (-n) % world
    a, b = shard_order(1000, 1, 0, 0, 1), shard_order(1000, 1, 0, 0, 2)
    assert not np.array_equal(a, b) and np.array_equal(a, shard_order(1000, 1, 0, 0, 1))  # new seeded order


def _run_steps(fast: bool, steps: int = 4):
    torch.manual_seed(0)
    model = ResNet()
    if fast:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(param_groups(model, 1e-4), lr=1e-3, eps=1e-7)
    images, labels = _data()
    train = images_to_tensor(images, "cpu", fast), torch.from_numpy(labels)
    order = torch.from_numpy(shard_order(N, 1, 0, SEED, 0))
    losses = []
    for s in range(steps):
        sums, count = train_epoch(model, opt, train, order[s * 16:(s + 1) * 16], 16, 1, "bilinear", fast,
                                  torch.Generator().manual_seed(s))
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
    from distributed_resnet.loop import DDP_OPTIONS

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
        order = torch.from_numpy(shard_order(N, 1, 0, SEED, 0))
        train_epoch(ddp, opt, train, order, 25, 2, "pixel", False, torch.Generator().manual_seed(0))
        views = [p.grad for p in model.parameters()]
        assert all(g is not None and g._is_view() for g in views)
        train_epoch(ddp, opt, train, order, 25, 2, "pixel", False, torch.Generator().manual_seed(1))
        assert all(p.grad is g for p, g in zip(model.parameters(), views))
    finally:
        dist.destroy_process_group()
