"""Where a CPU training step of the fast recipe goes, against this CPU's measured bf16 matmul peak.

One process, the project's own epoch function (`worker.train_epoch`, `--precision auto`: bf16 autocast +
channels_last on a CPU with native bf16), the fast recipe (SGD-Nesterov, symmetric padding, whole-pixel shifts,
label smoothing), batch 128, torch threads = --threads. Prints, as a Markdown table: the step's time by kind of
op (torch.profiler, self CPU time), the evaluation of 5,000 images, and achieved GFLOP/s (0.25 GFLOP per training
image, forward + backward) against a large bf16 matmul on the same threads, measured in the same run.

    python experiments/cpu_step/profile_step.py --data-dir ../shared/cifar10 --threads 2 --steps 40
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict

import torch

from distributed_resnet.config import TrainConfig
from distributed_resnet.data import load_cifar10
from distributed_resnet.device import use_bf16
from distributed_resnet.inference import images_to_tensor
from distributed_resnet.model import ResNet
from distributed_resnet.optim import build_optimizer
from distributed_resnet.worker import Augment, EpochPlan, evaluate, train_epoch

GFLOP_PER_IMAGE = 0.25  # ResNet-20 forward (~41 M multiply-adds) + backward (~2x), per training image
KINDS = [  # (kind, regex over aten op names), first match wins
    ("convolution (forward + backward)", r"convolution|mkldnn_conv|conv2d|_convolution"),
    ("BatchNorm (forward + backward)", r"batch_norm"),
    ("optimizer (SGD, foreach/fused)", r"_foreach|sgd|_fused"),
    ("augmentation and batch gather", r"index|gather|randint|randperm|where|flip|take|arange|pad"),
    ("loss, softmax, dense", r"cross_entropy|log_softmax|nll|addmm|mm$|linear"),
    ("ReLU, add, casts, other elementwise", r"relu|threshold|add|mul|copy_|to$|_to_copy|clone|div|sum|mean|fill|zero"),
]


def matmul_peak(threads: int, sizes=(2048, 4096), reps: int = 5, trials: int = 3) -> float:
    """GFLOP/s of large bf16 matmuls (what oneDNN gives these cores): the best of `trials` timings per size, since
    one timing on a shared 2-core machine has read 0.6x of another taken a minute later."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
        for _ in range(2):
            a @ b
        for _ in range(trials):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = max(best, reps * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default="../shared/cifar10")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(recipe="fast", data_dir=args.data_dir).validate()
    data = load_cifar10(cfg.data_dir, cfg.val_size, None, cfg.seed)
    device = torch.device("cpu")
    fast = use_bf16(cfg.precision, device)
    model = ResNet(padding=cfg.padding, bn_momentum=cfg.bn_momentum)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg, fused=fast)
    train = images_to_tensor(data.train.images, device, fast), torch.from_numpy(data.train.labels)
    val = images_to_tensor(data.val.images, device, fast), torch.from_numpy(data.val.labels)
    augment = Augment(cfg.shift, cfg.max_shift)
    n, batch = len(data.train.labels), cfg.batch_size

    def steps(first, count):
        model.train()
        train_epoch(model, opt, train, EpochPlan(n, batch, 1, 0, 0, 0, first_step=first, stop_step=first + count),
                    augment, fast, smoothing=cfg.label_smoothing)

    steps(0, 5)  # warm-up: oneDNN primitives, allocator
    t0 = time.perf_counter()
    steps(5, args.steps)
    step_s = (time.perf_counter() - t0) / args.steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        steps(5 + args.steps, args.steps)
    by_kind, others = defaultdict(float), defaultdict(float)
    for e in prof.key_averages():
        name = e.key.removeprefix("aten::")
        kind = next((k for k, rx in KINDS if re.search(rx, name)), "other")
        by_kind[kind] += e.self_cpu_time_total / 1e6 / args.steps
        if kind == "other":
            others[name] += e.self_cpu_time_total / 1e6 / args.steps
    total = sum(by_kind.values())
    model.eval()
    t0 = time.perf_counter()
    evaluate(model, *val, 128)
    eval_s = time.perf_counter() - t0
    peak = matmul_peak(args.threads)
    images_s = batch / step_s
    print(f"torch {torch.__version__}, {args.threads} threads, bf16 {fast}; step {1000 * step_s:.1f} ms "
          f"({images_s:.0f} images/s, {GFLOP_PER_IMAGE * images_s:.0f} GFLOP/s achieved; bf16 matmul peak "
          f"{peak:.0f} GFLOP/s: {GFLOP_PER_IMAGE * images_s / peak:.2f} of it)")
    print("| part of a step (batch 128) | ms per step | share |\n| --- | --- | --- |")
    for kind, seconds in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {1000 * seconds:.1f} | {seconds / total:.0%} |")
    print(f"| (profiled total, self CPU time) | {1000 * total:.1f} | |")
    top = sorted(others.items(), key=lambda kv: -kv[1])[:6]
    print("other, largest: " + ", ".join(f"{name} {1000 * s:.1f} ms" for name, s in top))
    print(f"evaluation of {len(val[1]):,} images: {eval_s:.2f} s; an epoch of {n:,} images is {n // batch + 1} steps "
          f"= {(n / batch) * step_s:.0f} s of training")


if __name__ == "__main__":
    main()
