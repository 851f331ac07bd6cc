"""The graph-safe step (a CUDA graph on a GPU) against the eager step: the mean training loss over steps 41-50 of
each, for 3 seeds, and each one's time for those 10 steps. Both steps take the LR as the same kind of fp32 device
tensor, changed at every step (so a fill that did not reach the graph shows), so with one seed they should agree to
rounding; the gate: every seed's gap under a tenth of the spread between seeds (and under 0.01).
`PYTHONPATH=. python experiments/gpu_plan/smoke_graph.py --device cuda --output smoke.json`."""

import argparse
import json
import statistics
import time

import numpy as np
import torch

from distributed_resnet.config import TrainConfig
from distributed_resnet.data import default_data_dir, load_cifar10
from distributed_resnet.device import use_bf16
from distributed_resnet.graphed import GraphSafeStep, tensor_lr
from distributed_resnet.inference import images_to_tensor
from distributed_resnet.model import ResNet
from distributed_resnet.optim import build_optimizer
from distributed_resnet.worker import Augment, EpochPlan, train_epoch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_loss(kind: str, seed: int, train, device, fast: bool, cfg: TrainConfig, steps: int, batch: int):
    torch.manual_seed(seed)
    model = ResNet(padding=cfg.padding, bn_momentum=cfg.bn_momentum).to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg, fused=True)
    augment = Augment(cfg.shift, cfg.max_shift)
    n = len(train[1])

    def lr_at(epoch, step):  # a ramp: every step its own LR
        return cfg.lr * (0.5 + step / steps)

    if kind == "graphed":
        step = GraphSafeStep(model, opt, *train, batch, augment, fast, cfg.label_smoothing)
        epoch = lambda plan: step.train_epoch(plan, lr_at)  # noqa: E731
    else:
        tensor_lr(opt)  # the same fp32 LR tensor, filled by set_lr at each step
        epoch = lambda plan: train_epoch(model, opt, train, plan, augment, fast, lr_at=lr_at,  # noqa: E731
                                         smoothing=cfg.label_smoothing)
    epoch(EpochPlan(n, batch, 1, 0, seed, 0, stop_step=steps - 10))
    sync(device)
    t0 = time.perf_counter()
    sums, count = epoch(EpochPlan(n, batch, 1, 0, seed, 0, first_step=steps - 10, stop_step=steps))
    sync(device)
    return float(sums[0]) / count, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--recipe", default="keras")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    fast = use_bf16("auto", device)
    cfg = TrainConfig(recipe=args.recipe).validate()
    data = load_cifar10(args.data_dir)
    train = images_to_tensor(np.ascontiguousarray(data.train.images), device, fast), \
        torch.from_numpy(data.train.labels).to(device)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "steps": args.steps,
           "batch": args.batch_size, "precision": "bf16" if fast else "fp32"}
    for kind in ("eager", "graphed"):
        runs = [last_loss(kind, seed, train, device, fast, cfg, args.steps, args.batch_size) for seed in range(args.seeds)]
        out[kind] = {"losses": [r[0] for r in runs], "seconds_10_steps": [r[1] for r in runs]}
        print(kind, json.dumps(out[kind]), flush=True)
    eager, graphed = out["eager"]["losses"], out["graphed"]["losses"]
    spread = max(eager) - min(eager)
    gap = max(abs(g - e) for g, e in zip(graphed, eager))  # seed by seed
    passed = gap <= min(0.1 * spread, 0.01)
    out.update(seed_spread=spread, largest_gap_same_seed=gap, passed=passed)
    print(f"loss after {args.steps} steps, median of {args.seeds} seeds: eager {statistics.median(eager):.4f}, "
          f"graphed {statistics.median(graphed):.4f}; largest gap for one seed {gap:.5f} against the seeds' spread "
          f"{spread:.4f}: {'passed' if passed else 'FAILED'}", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
