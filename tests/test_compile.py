"""`--compile`: the compiled step trains what the eager step trains (its loss after 50 steps within the eager
step's seed-to-seed spread), and a compile failure falls back to eager with one warning instead of ending the run."""

import pytest
import torch

from distributed_resnet.compiling import CompiledOrEager, unwrapped
from distributed_resnet.config import TrainConfig
from distributed_resnet.data import load_cifar10
from distributed_resnet.device import cpu_has_native_bf16
from distributed_resnet.errors import UserError
from distributed_resnet.inference import images_to_tensor
from distributed_resnet.model import ResNet
from distributed_resnet.optim import build_optimizer
from distributed_resnet.worker import Augment, EpochPlan, train_epoch

STEPS, BATCH = 50, 64  # 50 full steps: 1.7 epochs of the mini set's 1,900 training images


def loss_after(mini_dir, bf16: bool, compiled: bool, seed: int = 0, backend="inductor", warnings=None,
               steps: int = STEPS) -> float:
    """The mean training loss of the last 10 of `steps` steps of the fast recipe's step (its LR held at the peak),
    from `seed`'s initial weights, order and augmentation."""
    torch.manual_seed(seed)
    cfg = TrainConfig(recipe="fast", data_dir=mini_dir, val_size=100).validate()
    data = load_cifar10(mini_dir, 100, None, 0)
    model = ResNet(padding=cfg.padding, bn_momentum=cfg.bn_momentum)
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg, fused=bf16)
    net = CompiledOrEager(model, (warnings if warnings is not None else []).append, backend) if compiled else model
    train = images_to_tensor(data.train.images, torch.device("cpu"), bf16), torch.from_numpy(data.train.labels)
    n, augment = len(data.train.labels), Augment(cfg.shift, cfg.max_shift)
    per_epoch, total, count = n // BATCH, 0.0, 0
    for k in range(steps):
        epoch, step = divmod(k, per_epoch)
        sums, size = train_epoch(net, opt, train, EpochPlan(n, BATCH, 1, 0, seed, epoch, step, step + 1), augment,
                                 bf16, smoothing=cfg.label_smoothing)
        if k >= steps - 10:
            total, count = total + float(sums[0]), count + size
    return total / count


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="the compiled step is measured in bf16, native on this CPU")
def test_the_compiled_step_trains_what_the_eager_step_trains(mini_dir):
    """Over 3 seeds, the compiled bf16 step's mean loss after 50 steps is within the eager bf16 step's own
    seed-to-seed spread of the eager mean: what one seed moves is the yardstick of bf16 noise."""
    warnings = []
    eager = [loss_after(mini_dir, True, False, seed) for seed in range(3)]
    compiled = [loss_after(mini_dir, True, True, seed, warnings=warnings) for seed in range(3)]
    assert not warnings, warnings  # it compiled: no fallback
    spread = max(eager) - min(eager)
    assert abs(sum(compiled) / 3 - sum(eager) / 3) <= spread, (compiled, eager)


def test_a_compile_failure_trains_eagerly_after_one_warning(mini_dir):
    def broken_backend(graph, inputs):
        raise RuntimeError("no C++ compiler")  # what Inductor raises without one, in short

    warnings = []
    fallen = loss_after(mini_dir, False, True, backend=broken_backend, warnings=warnings, steps=10)
    assert len(warnings) == 1 and "falls back" not in warnings[0]
    assert warnings[0].startswith("warning: torch.compile failed") and "training eagerly instead" in warnings[0]
    assert fallen == loss_after(mini_dir, False, False, steps=10)  # the same eager steps, bit for bit


def test_compile_wraps_ddp_and_refuses_deterministic():
    model = ResNet()
    net = CompiledOrEager(model, print)
    assert unwrapped(net) is model and unwrapped(model) is model
    assert [p.data_ptr() for p in net.parameters()] == [p.data_ptr() for p in model.parameters()]
    with pytest.raises(UserError, match="drop --compile"):
        TrainConfig(deterministic=True, precision="fp32", compile=True).validate()
