"""The fast recipe: its preset, its one-cycle LR (also across a resume), its loss, a real run and flip TTA."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from distributed_resnet.cli import Parser, add_train_args, config_from_args
from distributed_resnet.config import TrainConfig
from distributed_resnet.recipes import RECIPES
from distributed_resnet.optim import build_optimizer, training_loss
from distributed_resnet.schedule import OneCycle, lr_policy


def test_the_fast_preset_resolves_to_its_documented_values_and_an_override_wins():
    fast = TrainConfig(recipe="fast").validate()
    assert (fast.optimizer, fast.lr, fast.momentum, fast.nesterov) == ("sgd", 0.15, 0.9, True)
    assert (fast.lr_policy, fast.epochs, fast.schedule_epochs, fast.warmup_fraction, fast.warmup_start_factor,
            fast.anneal, fast.final_lr) == ("onecycle", 30, 30, 0.15, 0.1, "linear", 0.0)
    assert (fast.weight_decay, fast.weight_decay_on, fast.label_smoothing) == (2.5e-4, "weights", 0.1)
    assert (fast.shift, fast.max_shift, fast.flip, fast.padding, fast.bn_momentum) == \
        ("pixel", 0.125, "random", "symmetric", 0.1)
    keras = TrainConfig().validate()
    assert {k: getattr(keras, k) for k in RECIPES["keras"]} == RECIPES["keras"]
    assert (keras.optimizer, keras.lr, keras.lr_policy, keras.epochs, keras.schedule_epochs) == ("adam", 1e-3, "keras", 200, 200)
    # An explicit value wins, on the command line as in Python; a longer fast run stretches its cycle.
    p = Parser(prog="train")
    add_train_args(p)
    cfg = config_from_args(p.parse_args(["--recipe", "fast", "--lr", "0.2", "--epochs", "40", "--shift", "bilinear"]))
    assert (cfg.recipe, cfg.lr, cfg.epochs, cfg.schedule_epochs, cfg.shift, cfg.optimizer) == \
        ("fast", 0.2, 40, 40, "bilinear", "sgd")
    assert TrainConfig(recipe="fast", label_smoothing=0.0).label_smoothing == 0.0
    assert config_from_args(p.parse_args(["--data-dir", "x"])) == TrainConfig(data_dir="x")  # no flag: the Keras recipe
    assert "fast: 0.15" in p.format_help()  # --help shows what each recipe sets


@pytest.mark.parametrize("step,lr", [(0, 0.015), (45, 0.0825), (90, 0.15), (95, 0.15 * (1 - 5 / 509)), (599, 0.0)])
def test_one_cycle_lr_at_chosen_steps(step, lr):
    """600 steps: warm-up 0.015 -> 0.15 over the first 90 (15%), then linear to 0 at the last step."""
    cycle = OneCycle(peak=0.15, total_steps=600, steps_per_epoch=60)
    assert cycle.lr_at(step) == pytest.approx(lr, abs=1e-12)
    assert cycle.lr(step // 60, step % 60) == cycle.lr_at(step)  # by (epoch, step in it): what a resumed epoch asks


def test_one_cycle_cosine_and_floor():
    cycle = OneCycle(peak=0.1, total_steps=100, warmup_fraction=0.0, anneal="cosine", final_lr=0.001)
    assert cycle.lr_at(0) == pytest.approx(0.1) and cycle.lr_at(99) == pytest.approx(0.001)
    assert cycle.lr_at(49.5) == pytest.approx(0.001 + 0.099 * 0.5)
    # The policy the config names, its length from schedule_epochs x the steps of an epoch.
    policy = lr_policy(TrainConfig(recipe="fast", epochs=10), steps_per_epoch=352)
    assert policy.per_step and policy.total_steps == 3520 and policy.end_epoch(0, 1.0) is False


def test_the_smoothed_loss_is_torchs_label_smoothing():
    logits, labels = torch.randn(64, 10, dtype=torch.float64), torch.randint(0, 10, (64,))
    for smoothing in (0.0, 0.1, 0.3):
        assert training_loss(logits, labels, smoothing).item() == \
            pytest.approx(F.cross_entropy(logits, labels, label_smoothing=smoothing).item(), rel=1e-12)
    bf16 = training_loss(logits.bfloat16(), labels, 0.1)
    assert bf16.dtype == torch.float32  # bf16 logits: the loss in fp32


def test_weight_decay_on_weights_spares_batchnorm_and_biases():
    from distributed_resnet.model import ResNet

    model = ResNet(8, bn_momentum=0.1)
    assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}
    opt = build_optimizer(model, TrainConfig(recipe="fast"), fused=False)
    decayed, free = opt.param_groups
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and decayed["weight_decay"] == 5e-4
    assert {id(p) for p in decayed["params"]} == {id(m.weight) for m in model.modules()
                                                  if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert free["weight_decay"] == 0.0 and len(free["params"]) == len(list(model.parameters())) - len(decayed["params"])


def test_a_fast_run_resumed_half_way_continues_its_cycle_at_the_same_step(tmp_path, mini_dir):
    """A real `--recipe fast` run (local mode, fp64 so that equal means equal): 2 epochs at once, and 1 epoch then
    `--resume` for the second. The same LRs, and the same weights at the end: the cycle and SGD's momentum carry over.
    With `--progressive-resize 16:1`: the first epoch trains at 16 px, the resumed second at full size."""
    from distributed_resnet.driver import run_training

    base = dict(recipe="fast", num_workers=0, data_dir=mini_dir, storage_path=str(tmp_path), max_train_samples=512,
                val_size=100, depth=8, precision="fp64", schedule_epochs=2, progressive_resize="16:1")
    whole = run_training(TrainConfig(epochs=2, name="whole", **base), quiet=True)
    run_training(TrainConfig(epochs=1, name="halves", **base), quiet=True)
    halves = run_training(TrainConfig(epochs=2, name="halves", resume=True, **base), quiet=True)
    assert halves["restarts"] == [1]
    steps = math.ceil(512 / 128)
    cycle = OneCycle(0.15, 2 * steps, steps_per_epoch=steps)
    assert [h["lr"] for h in whole["history"]] == [cycle.lr(0), cycle.lr(1)] == [h["lr"] for h in halves["history"]]
    assert [h["train_size"] for h in whole["history"]] == [16, 32] == [h["train_size"] for h in halves["history"]]
    for key in ("train_loss", "val_loss", "test_loss"):
        assert halves["history"][-1][key] == pytest.approx(whole["history"][-1][key], rel=1e-12, abs=0)
    saved = json.loads((tmp_path / "whole" / "results.json").read_text())["config"]
    assert (saved["recipe"], saved["optimizer"], saved["lr_policy"], saved["label_smoothing"]) == \
        ("fast", "sgd", "onecycle", 0.1)
    assert whole["history"][-1]["train_loss"] < whole["history"][0]["train_loss"]


def test_evaluate_reports_flip_tta_beside_the_plain_number(tmp_path, mini_dir):
    out = tmp_path / "eval.json"
    proc = run_cli("evaluate", "--checkpoint", "results/resnet20v1", "--data-dir", mini_dir, "--tta", "flip",
                   "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    from distributed_resnet.evaluate import evaluate_checkpoint

    plain = evaluate_checkpoint("results/resnet20v1", mini_dir)
    assert r["test_accuracy"] == plain["test_accuracy"] and "test_accuracy_tta_flip" not in plain
    assert 0.8 < r["test_accuracy_tta_flip"] <= 1
    assert f"with flip TTA: {100 * r['test_accuracy_tta_flip']:.2f}%" in proc.stdout


def test_the_fast_sweep_runs_every_trial_at_full_length():
    from distributed_resnet.sweeps.spec import default_point
    from distributed_resnet.sweeps.spec import load_sweep, planned_trials, scheduler_spec, trial_config

    spec = load_sweep("tune_configs/fast_sweep.yaml")
    base = TrainConfig.from_dict(trial_config(spec, {}))
    assert base.recipe == "fast" and base.epochs == base.schedule_epochs <= 30 and base.max_train_samples is None
    assert scheduler_spec(spec)["type"] == "none" and planned_trials(spec) >= 6
    assert default_point(spec) == {k: getattr(TrainConfig(recipe="fast"), k) for k in spec["search"]}

    # On a GPU: the same file with tune's resource flags; only the resources and the concurrency change.
    gpu = load_sweep("tune_configs/fast_sweep.yaml", {"cpus_per_worker": 1, "gpus_per_worker": 0.125,
                                                      "max_concurrent_trials": 6, "num_workers": None})
    assert {k: v for k, v in gpu.items() if k not in ("resources", "max_concurrent_trials")} == \
        {k: v for k, v in spec.items() if k not in ("resources", "max_concurrent_trials")}
    assert gpu["resources"] == {**spec["resources"], "cpus_per_worker": 1, "gpus_per_worker": 0.125}
    assert gpu["max_concurrent_trials"] == 6 and spec["max_concurrent_trials"] == 1
    assert trial_config(gpu, {})["use_gpu"] is True and trial_config(spec, {})["use_gpu"] is False


def test_the_benchmark_times_the_fast_recipe(mini_dir):
    """`bench --recipe fast`: the hand-written loop and the project's step, with the recipe's optimizer and shifts."""
    from distributed_resnet.bench import bench_plain, bench_step
    from distributed_resnet.data import load_cifar10

    data = load_cifar10(mini_dir)
    cfg = TrainConfig(recipe="fast").validate()
    args = (data.train.images[:256], data.train.labels[:256], 64, torch.device("cpu"), 2, 1)
    assert bench_plain(*args, False, cfg) > 0 and bench_step(*args, True, cfg) > 0
    assert bench_step(*args, True, cfg, graphed=True) > 0
