"""`python -m distributed_resnet.bench`: training throughput, side by side, measured in one run.

Ways to train the same ResNet on the same images with the same global batch and augmentation (`--recipe`: the
Keras recipe's Adam, 'same' padding and bilinear shifts, or the fast recipe's SGD-Nesterov, symmetric padding,
whole-pixel shifts and label smoothing):
- `plain fp32`: the loop a user writes by hand: one process, eager fp32, the recipe's optimizer (the baseline row);
- `plain bf16`: the same loop with bf16 autocast and channels_last (what bf16 alone gives; skipped on a CPU
  without native bf16, which emulates it at a fraction of fp32's speed);
- `step`: the project's own epoch function (`worker.train_epoch`, `--precision auto`), one process; for the Keras
  recipe with TF 'same' padding and with symmetric padding (what the reference's padding costs);
- `ray`: the full Ray Train path (`run_training`, N workers, DDP), steady-state epochs, plus its wall time; with
  several workers once with per-worker BatchNorm statistics, once with the global BatchNorm (the default), and
  once in fp32 with `--deterministic` (sums over the batch independent of N: `deterministic.py`); with one worker
  also with `--cuda-graph on` (the graph-safe step: one CUDA graph per step on a GPU, eager on a CPU);
- `packed` (`--packed N`): N Ray Train runs of 1 worker at once, sharing one GPU (`--gpus-per-worker 1/N`; on a
  CPU, `--cpus-per-worker` each), as N separate `python -m distributed_resnet.train` drivers on one Ray cluster:
  their images/s together, and how much of their timed spans all N ran side by side.
Each prints images/s, seconds per 45,000-image epoch and the ratio to `plain fp32`, and peak GPU memory on CUDA.
Timing waits for the device (synchronize) before reading the clock, after warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from .augment import random_flip_shift, to_float
from .cli import Parser, main_guard
from .config import IMAGE_SIDE, TrainConfig
from .data import default_data_dir, load_cifar10
from .device import use_bf16
from .inference import images_to_tensor
from .compiling import CompiledOrEager
from .graphed import WARMUP_STEPS, GraphSafeStep
from .worker import Augment, EpochPlan, train_epoch
from .model import ResNet, param_groups
from .optim import build_optimizer

EPOCH_IMAGES = 45_000  # CIFAR-10's training set less the 5,000 validation images


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_budget(n_images: int, batch: int, steps: int, warmup: int) -> tuple[int, int]:
    """(timed steps, warm-up steps), shortened so that every step gets a full batch of distinct images from one
    epoch: past its end the epoch function would time empty batches."""
    available = n_images // batch
    if warmup + steps > available:
        warmup = min(warmup, max(1, available // 5))
        steps = max(1, available - warmup)
    return steps, warmup


def bench_plain(images, labels, batch, device, steps, warmup, bf16: bool, cfg: TrainConfig) -> float:
    """images/s of a hand-written eager loop (fp32, or bf16 autocast + channels_last)."""
    model = ResNet(padding=cfg.padding).to(device)
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    model = model.to(memory_format=fmt)
    groups = param_groups(model, cfg.weight_decay, cfg.weight_decay_on)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    else:
        opt = torch.optim.Adam(groups, lr=cfg.lr)
    shift = {"shift": cfg.shift, "max_shift": cfg.max_shift}
    x_all, y_all = images_to_tensor(images, device, bf16), torch.from_numpy(labels).to(device)
    n = len(y_all)

    def step():
        idx = torch.randint(0, n, (batch,), device=device)
        x = random_flip_shift(to_float(x_all[idx]), **shift).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y_all[idx], label_smoothing=cfg.label_smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.train()
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def bench_step(images, labels, batch, device, steps, warmup, fast, cfg: TrainConfig, compiled=False,
               side: int | None = None, graphed=False) -> float:
    """images/s of the project's epoch function on one process (`compiled`: `--compile`, compiled in warm-up;
    `side`: the images resized to side x side after augmentation, as `--progressive-resize` does; `graphed`: the
    graph-safe step, with a fused optimizer, captured as a CUDA graph in warm-up on CUDA, eager elsewhere)."""
    model = ResNet(padding=cfg.padding, bn_momentum=cfg.bn_momentum).to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg, fused=fast or graphed)
    if compiled:
        model = CompiledOrEager(model, warn=lambda text: print(f"  {text}", flush=True))
    train = images_to_tensor(images, device, fast), torch.from_numpy(labels).to(device)
    n = len(labels)
    augment = Augment(cfg.shift, cfg.max_shift)
    if graphed:
        step = GraphSafeStep(model, opt, *train, batch, augment, fast, smoothing=cfg.label_smoothing, side=side)
        epoch = lambda plan: step.train_epoch(plan)  # noqa: E731
    else:
        epoch = lambda plan: train_epoch(model, opt, train, plan, augment, fast,  # noqa: E731
                                         smoothing=cfg.label_smoothing, side=side)
    epoch(EpochPlan(n, batch, 1, 0, 0, 0, stop_step=warmup))
    _sync(device)
    t0 = time.perf_counter()
    epoch(EpochPlan(n, batch, 1, 0, 0, 0, first_step=warmup, stop_step=warmup + steps))
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def bench_ray(data_dir, workers, batch, samples, epochs, use_gpu, batchnorm="global", recipe="keras",
              deterministic=False, compiled=False, cpus_per_worker=1, graphed=False) -> tuple[float, float]:
    """(steady-state images/s of the last epoch, wall seconds of the whole run) for the Ray Train path."""
    from .driver import run_training

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(recipe=recipe, num_workers=workers, batch_size=batch, epochs=epochs, data_dir=data_dir,
                          max_train_samples=samples, storage_path=tmp, name="bench", use_gpu=use_gpu, num_to_keep=1,
                          batchnorm=batchnorm, deterministic=deterministic, compile=compiled,
                          cpus_per_worker=cpus_per_worker, cuda_graph="on" if graphed else "off",
                          precision="fp32" if deterministic else "auto")
        t0 = time.time()
        results = run_training(cfg, quiet=True)
        return results["history"][-1]["images_per_second"], time.time() - t0


def bench_packed(data_dir, runs, batch, samples, epochs, use_gpu, recipe="keras", cpus_per_worker=1
                 ) -> tuple[float, float]:
    """(images/s of `runs` Ray Train runs at once, all together; the overlap of their timed spans, `packed_rate`).

    Each run is its own driver process, `python -m distributed_resnet.train --address <the bench's cluster>`, of
    1 worker with `--gpus-per-worker 1/runs` on a GPU (the step a CUDA graph there, `--cuda-graph auto`), as a
    user packs several runs, or a sweep its trials, on one GPU. Test only in the last epoch.
    """
    import ray

    from .driver import init_ray

    init_ray()  # the local cluster the Ray rows use; the runs join it
    command = [sys.executable, "-m", "distributed_resnet.train", "--address", ray.get_runtime_context().gcs_address,
               "--recipe", recipe, "--num-workers", "1", "--cpus-per-worker", str(cpus_per_worker),
               "--batch-size", str(batch), "--epochs", str(epochs), "--test-every", str(epochs),
               "--max-train-samples", str(samples), "--data-dir", data_dir, "--num-to-keep", "1",
               "--cuda-graph", "auto", *(("--gpu", "--gpus-per-worker", f"{1 / runs:.4f}") if use_gpu else ("--no-gpu",))]
    with tempfile.TemporaryDirectory() as tmp:
        logs = [open(os.path.join(tmp, f"run{i}.log"), "w") for i in range(runs)]
        procs = [subprocess.Popen(command + ["--storage-path", tmp, "--name", f"run{i}"], stdout=log,
                                  stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
        codes = [proc.wait() for proc in procs]
        for log in logs:
            log.close()
        failed = next((i for i, code in enumerate(codes) if code), None)
        if failed is not None:
            with open(logs[failed].name) as f:
                last_line = (f.read().strip().splitlines() or [""])[-1]
            raise RuntimeError(f"packed run {failed} of {runs} exited {codes[failed]}: {last_line}")
        histories = []
        for i in range(runs):
            with open(os.path.join(tmp, f"run{i}", "results.json")) as f:
                histories.append(json.load(f)["history"])
    return packed_rate(histories)


def packed_rate(histories: list[list[dict]]) -> tuple[float, float]:
    """(images/s of all runs together, overlap) from each run's epochs after its first (warm-up, capture).

    A run's rate: the images of those epochs over the wall time from the end of its first epoch to the end of its
    last, its evaluations included. The sum is the runs' throughput together only while they all ran at once:
    the overlap is the share of the longest run's span during which every run was in its span (1.0: side by side
    throughout; lower: a run ran partly alone, and the sum overstates).
    """
    if any(len(history) < 2 for history in histories):
        raise ValueError("packed_rate needs at least 2 epochs of each run")
    spans = [(history[0]["ended_at"], history[-1]["ended_at"]) for history in histories]
    total = sum(sum(h["images_per_second"] * h["train_seconds"] for h in history[1:]) / (end - start)
                for history, (start, end) in zip(histories, spans))
    common = min(end for _, end in spans) - max(start for start, _ in spans)
    return total, max(0.0, common) / max(end - start for start, end in spans)


def run_counts(text: str) -> list[int]:
    """`--packed 2,4`: how many runs share the GPU, per row."""
    counts = [part.strip() for part in text.split(",") if part.strip()]
    if not counts or not all(count.isdigit() and 2 <= int(count) <= 16 for count in counts):
        raise argparse.ArgumentTypeError(f"takes run counts of 2 to 16, comma-separated (e.g. 2,4), got {text!r}")
    return [int(count) for count in counts]


def image_sides(text: str) -> list[int]:
    """`--train-sizes 16,24`: sides in pixels, as `--progressive-resize` takes them."""
    sides = [part.strip() for part in text.split(",") if part.strip()]
    if not all(side.isdigit() and 8 <= int(side) <= IMAGE_SIDE for side in sides):
        raise argparse.ArgumentTypeError(f"takes sides of 8 to {IMAGE_SIDE} px, comma-separated (e.g. 16,24), "
                                         f"got {text!r}")
    return [int(side) for side in sides]


def main(argv=None) -> int:
    p = Parser(prog="python -m distributed_resnet.bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer steps: a minute on a 2-core CPU")
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: 2 on CPU, 1 on CUDA)")
    p.add_argument("--recipe", choices=("keras", "fast"), default="keras", help="the recipe's optimizer, padding and "
                   "augmentation in every row (default %(default)s)")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="threads per Ray Train worker (default %(default)s)")
    p.add_argument("--compile", action="store_true", help="add the --compile rows: the compiled step beside the "
                   "eager one, and the Ray Train path with --compile")
    p.add_argument("--train-sizes", type=image_sides, default=[], metavar="SIDE,...", help="add rows of the project "
                   "step with the images resized to these sides (e.g. 16,24: the early epochs of --progressive-resize "
                   "16:10,24:10)")
    p.add_argument("--packed", type=run_counts, default=[], metavar="N,...", help="add rows of N Ray Train runs of "
                   "1 worker at once, sharing the GPU (--gpus-per-worker 1/N; on a CPU --cpus-per-worker each): "
                   "their images/s together")
    p.add_argument("--output", default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    workers = args.workers or (2 if cpu else 1)
    cfg = TrainConfig(recipe=args.recipe, batch_size=args.batch_size, num_workers=workers).validate()
    data = load_cifar10(args.data_dir)
    images, labels = np.ascontiguousarray(data.train.images), data.train.labels
    steps, warmup = (15, 3) if cpu and args.quick else (40, 5) if cpu else (100, 30) if args.quick else (300, 50)
    steps, warmup = step_budget(len(labels), args.batch_size, steps, warmup)
    ray_samples = min(len(labels), args.batch_size * steps)
    ray_epochs = 2 if args.quick else 3
    fast = use_bf16("auto", device)
    rows = []
    print(f"recipe {args.recipe}; device {torch.cuda.get_device_name(device) if not cpu else f'cpu ({torch.get_num_threads()} threads)'}, "
          f"batch {args.batch_size}, {steps} timed steps; project precision: {'bf16' if fast else 'fp32'}", flush=True)

    def row(name, ips):
        rows.append((name, ips))
        print(f"  {name}: {ips:,.0f} img/s", flush=True)

    row("plain eager PyTorch loop, fp32, 1 process",
        bench_plain(images, labels, args.batch_size, device, steps, warmup, False, cfg))
    if fast or not cpu:
        row("plain loop, bf16 autocast + channels_last, 1 process",
            bench_plain(images, labels, args.batch_size, device, steps, warmup, True, cfg))
    else:
        print("  (plain bf16 loop skipped: this CPU has no native bf16)", flush=True)
    paddings = ("same", "symmetric") if args.recipe == "keras" else (cfg.padding,)
    for padding in paddings:
        row(f"project step, 1 process ({'bf16' if fast else 'fp32'}, {padding} padding)",
            bench_step(images, labels, args.batch_size, device, steps, warmup, fast, replace(cfg, padding=padding)))
    full_size = rows[len(rows) - len(paddings) + paddings.index(cfg.padding)][1]  # the step with the recipe's padding
    for side in args.train_sizes:
        row(f"project step, 1 process ({'bf16' if fast else 'fp32'}, {cfg.padding} padding), at {side} px",
            bench_step(images, labels, args.batch_size, device, steps, warmup, fast, cfg, side=side))
        print(f"  {side} px / 32 px step: {rows[-1][1] / full_size:.2f}x", flush=True)
    graph = "a CUDA graph" if not cpu else "run eagerly on the CPU"
    graph_row = None
    if cpu or warmup > WARMUP_STEPS:  # on CUDA it is captured after WARMUP_STEPS eager steps, all in the warm-up
        row(f"project step, 1 process ({'bf16' if fast else 'fp32'}), graph-safe (static buffers, LR on the "
            f"device), {graph}", bench_step(images, labels, args.batch_size, device, steps, warmup, fast, cfg,
                                            graphed=True))
        graph_row = rows[-1][1]
        print(f"  graph-safe / eager step: {rows[-1][1] / full_size:.2f}x", flush=True)
    else:
        print(f"  (graph-safe step skipped: {warmup} warm-up steps fit the data, it needs {WARMUP_STEPS + 1})",
              flush=True)
    if args.compile:
        eager = full_size
        row(f"project step, 1 process ({'bf16' if fast else 'fp32'}, {cfg.padding} padding), --compile",
            bench_step(images, labels, args.batch_size, device, steps, warmup, fast, cfg, compiled=True))
        print(f"  compiled / eager step: {rows[-1][1] / eager:.2f}x", flush=True)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if not cpu else None
    singles = len(rows)
    # (batchnorm, deterministic, compiled, graphed)
    variants = (("local", False, False, False), ("global", False, False, False), ("global", True, False, False)) \
        if workers > 1 else (("global", False, False, False), ("global", False, False, True),
                             ("global", True, False, False))
    ray_rows = {}
    for batchnorm, deterministic, compiled, graphed in variants + ((("global", False, True, False),) if args.compile
                                                                  else ()):
        ips, wall = bench_ray(args.data_dir, workers, args.batch_size, ray_samples, ray_epochs, not cpu, batchnorm,
                              args.recipe, deterministic, compiled, args.cpus_per_worker, graphed)
        ray_rows[(deterministic, compiled, batchnorm, graphed)] = ips
        what = {"local": ", per-worker BatchNorm", "global": ", global BatchNorm (the default)"}[batchnorm] \
            if workers > 1 else ""
        if deterministic:
            what = ", fp32 --deterministic"
        if compiled:
            what += ", --compile"
        if graphed:
            what += f", --cuda-graph on ({graph.replace('run eagerly', 'eager')})"
        if args.cpus_per_worker > 1:
            what += f", {args.cpus_per_worker} CPUs each"
        row(f"Ray Train path, {workers} worker{'s' if workers > 1 else ''}{what}", ips)
        if graphed and graph_row and not cpu:  # on a CPU the 1-process rows use every thread, a worker its own
            print(f"  Ray Train path / 1 process, both graph-safe: {ips / graph_row:.2f}x", flush=True)
    if args.compile:
        print(f"  Ray Train path, --compile / eager: "
              f"{ray_rows[(False, True, 'global', False)] / ray_rows[(False, False, 'global', False)]:.2f}x", flush=True)
    packed_samples = min(len(labels), EPOCH_IMAGES) if not cpu else ray_samples
    packed_epochs, overlaps = ray_epochs + 2, {}
    for runs in args.packed:
        ips, overlap = bench_packed(args.data_dir, runs, args.batch_size, packed_samples, packed_epochs, not cpu,
                                    args.recipe, args.cpus_per_worker)
        share = f"--gpus-per-worker {1 / runs:.4g}, a CUDA graph each" if not cpu else \
            f"{args.cpus_per_worker} CPU each"
        row(f"{runs} Ray Train runs at once, 1 worker each ({share}), together", ips)
        overlaps[runs] = overlap
        print(f"  all {runs} ran side by side for {overlap:.0%} of the longest run's timed span"
              f"{' (less than 80%: the total overstates)' if overlap < 0.8 else ''}", flush=True)
    base, best_single = rows[0][1], max(ips for name, ips in rows[:singles])
    print(f"\n{'variant':<66} {'images/s':>10} {'s/epoch':>8} {'vs plain':>9} {'vs best 1-process':>18}")
    for name, ips in rows:
        print(f"{name:<66} {ips:>10,.0f} {EPOCH_IMAGES / ips:>8.1f} {ips / base:>8.2f}x {ips / best_single:>17.2f}x")
    print(f"(s/epoch: {EPOCH_IMAGES:,} images; Ray rows: the last of {ray_epochs} epochs; "
          f"Ray run wall time incl. start-up: {wall:.1f}s for "
          f"{ray_epochs} x {ray_samples} images{f'; peak GPU memory {peak:.2f} GiB' if peak else ''}"
          + (f"; packed rows: epochs 2-{packed_epochs} of {packed_samples} images per run, evaluation included"
             if args.packed else "") + ")")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"recipe": args.recipe, "device": args.device, "batch_size": args.batch_size, "workers": workers,
                       "rows": [{"variant": n, "images_per_second": i} for n, i in rows],
                       "ray_wall_seconds": wall, "peak_gpu_gib": peak, "packed_overlap": overlaps}, f, indent=1)
    return 0


def console() -> None:
    """The `distributed-resnet-bench` console script (the same as `python -m distributed_resnet.bench`)."""
    main_guard(main)


if __name__ == "__main__":
    console()
