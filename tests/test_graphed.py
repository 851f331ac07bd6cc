"""The graph-safe step (graphed.py), on the CPU: the parts of a CUDA graph's contract that a CPU can check. The
same numbers as the eager step over an epoch with a short last step; fixed addresses across steps; nothing read
back to the host and no tensor built from host values inside a step. (The capture itself needs a GPU.)"""

import copy
import re

import numpy as np
import pytest
import torch

from dispatch_ops import OpsSeen
from distributed_resnet.augment import alternating_flips
from distributed_resnet.graphed import GraphSafeStep
from distributed_resnet.model import ResNet, param_groups
from distributed_resnet.worker import Augment, EpochPlan, train_epoch

N, BATCH, SEED = 72, 32, 3  # steps of 32, 32 and 8


def _setup(optimizer: str, flips: str):
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)).permute(0, 3, 1, 2)
    labels = torch.from_numpy(rng.integers(0, 10, N))
    torch.manual_seed(0)
    model = ResNet(8)
    first = alternating_flips(N, SEED, "cpu") if flips == "alternate" else None
    return model, (images, labels), Augment("bilinear", 0.1, first)


def _optimizer(model, kind: str):
    groups = param_groups(model, 1e-4)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True, fused=True)
    return torch.optim.Adam(groups, lr=1e-3, eps=1e-7, fused=True)


def lr_at(epoch, step):
    """A per-step LR whose values fp32 holds exactly, as the eager step's Python floats do."""
    return 2.0 ** -10 * (1 + step + 3 * epoch)


@pytest.mark.parametrize("kind, flips, shift", [("sgd", "random", "pixel"), ("adam", "alternate", "bilinear")])
def test_the_graph_safe_step_trains_what_the_eager_step_trains(kind, flips, shift):
    model, train, augment = _setup(kind, flips)
    augment = augment._replace(shift=shift)
    twin = copy.deepcopy(model)
    eager_opt, safe_opt = _optimizer(model, kind), _optimizer(twin, kind)
    step = GraphSafeStep(twin, safe_opt, *train, BATCH, augment, fast=False)
    assert step.dy.dtype == (torch.long if shift == "pixel" else torch.float32)
    for epoch in range(2):
        plan = EpochPlan(N, BATCH, 1, 0, SEED, epoch)
        eager_sums, eager_count = train_epoch(model, eager_opt, train, plan, augment, False, lr_at=lr_at)
        sums, count = step.train_epoch(EpochPlan(N, BATCH, 1, 0, SEED, epoch), lr_at=lr_at)
        assert count == eager_count == N  # the short last step counts its 8 images, as the eager step does
        assert torch.equal(sums, eager_sums)
    # Bit for bit. (With an LR fp32 cannot hold exactly, its tensor differs from the eager step's double in the
    # last bit, and Adam amplifies that in the parameters whose gradient is ~0, such as a conv bias before BN.)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(b, a)
    assert float(step.lr) == pytest.approx(lr_at(1, 2))


def test_a_full_step_keeps_its_addresses_and_never_syncs_with_the_host():
    model, train, augment = _setup("adam", "random")
    optimizer = _optimizer(model, "adam")
    step = GraphSafeStep(model, optimizer, *train, BATCH, augment, fast=False)
    plan = EpochPlan(N, BATCH, 1, 0, SEED, 0)
    order = plan.order

    def addresses():
        tensors = [step.idx, step.dy, step.dx, step.flip, step.lr, step.sums, *model.parameters(),
                   *(p.grad for p in model.parameters()), *model.buffers(),
                   *(t for s in optimizer.state.values() for t in s.values())]
        return [t.data_ptr() for t in tensors]

    step._prepare(plan, 0, order)
    step._run_full_step()  # the first step creates the gradients and Adam's state
    before = addresses()
    with OpsSeen() as host_side:
        step.lr.fill_(2e-3)
        step._prepare(plan, 1, order)
    with OpsSeen() as inside:
        step._run_full_step()
    assert addresses() == before
    assert "aten.convolution_backward.default" in inside.seen and "aten._fused_adam_.tensor_lr" in inside.seen
    assert "aten.rand.generator" in host_side.seen  # the draws happen before the step, into its buffers
    for ops in (inside.seen, host_side.seen):
        assert not {op for op in ops if "_local_scalar_dense" in op or "lift_fresh" in op}, ops
    assert not {op for op in inside.seen if "rand" in op}  # no random numbers inside: a graph would replay them


def test_cuda_graph_on_trains_the_run_the_eager_step_trains_and_either_resumes_the_other(tmp_path, mini_dir):
    """`--cuda-graph on` through the whole loop (local mode, on the CPU: the graph-safe step runs eagerly): the
    numbers of the eager step's run, bit for bit (bf16: both steps use the fused optimizers; an LR that fp32 holds
    exactly); its checkpoint (the LR saved as a number) resumes with the eager step."""
    from distributed_resnet.config import TrainConfig
    from distributed_resnet.driver import run_training

    base = dict(num_workers=0, data_dir=mini_dir, storage_path=str(tmp_path), max_train_samples=200, val_size=100,
                lr=2.0 ** -10, precision="bf16", num_to_keep=1, max_test_samples=100)  # 2 steps an epoch: 128 + 72
    graphed = run_training(TrainConfig(epochs=2, name="on", cuda_graph="on", **base), quiet=True)
    eager = run_training(TrainConfig(epochs=2, name="off", **base), quiet=True)
    for a, b in zip(graphed["history"], eager["history"]):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy"):
            assert a[key] == b[key], key
    resumed = run_training(TrainConfig(epochs=3, name="on", resume=True, **base), quiet=True)
    assert resumed["restarts"] == [2] and [h["epoch"] for h in resumed["history"]] == [1, 2, 3]


@pytest.mark.parametrize("change, says", [
    (dict(num_workers=2), "--cuda-graph on captures one worker's step"),
    (dict(num_workers=(1, 2)), "--cuda-graph on captures one worker's step"),
    (dict(compile=True), "drop one of them"),
    (dict(cuda_graph="sometimes"), "--cuda-graph must be auto, on or off"),
])
def test_cuda_graph_settings_it_cannot_honour_are_one_line_errors(change, says):
    from distributed_resnet.config import TrainConfig
    from distributed_resnet.errors import UserError

    values = {"cuda_graph": "on", **change}
    if isinstance(values.get("num_workers"), tuple):
        values["min_workers"], values["num_workers"] = values["num_workers"]
    with pytest.raises(UserError, match=re.escape(says)) as e:
        TrainConfig(**values).validate()
    assert "\n" not in str(e.value)
