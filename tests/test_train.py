"""End-to-end training on the real (mini) CIFAR-10: local mode, resume rules, seeds, export. (Two Ray Train
workers and the run folder they leave: test_api.py; the command line's lines: test_resilience.py.)"""

import re

import pytest

from distributed_resnet.config import TrainConfig
from distributed_resnet.errors import UserError


def test_local_mode_runs_in_process_and_resumes(tmp_path, mini_dir):
    """--num-workers 0: the loop runs in this process; checkpoints land in the run folder; --resume continues."""
    from distributed_resnet.driver import run_training

    base = dict(num_workers=0, data_dir=mini_dir, storage_path=str(tmp_path), name="local", max_train_samples=256,
                val_size=100, num_to_keep=1)
    first = run_training(TrainConfig(epochs=2, **base), quiet=True)
    assert first["epochs"] == 2 and first["restarts"] == []
    kept = sorted(p.name for p in (tmp_path / "local").glob("checkpoint_epoch_*"))
    assert kept == sorted({f"checkpoint_epoch_{first['best_epoch']:04d}", "checkpoint_epoch_0002"})
    with pytest.raises(UserError, match="already exists"):
        run_training(TrainConfig(epochs=3, **base), quiet=True)
    second = run_training(TrainConfig(epochs=3, resume=True, **base), quiet=True)
    assert second["restarts"] == [2] and [h["epoch"] for h in second["history"]] == [1, 2, 3]
    assert second["history"][:2] == first["history"]
    # Resuming a run whose last checkpoint is its final epoch trains nothing and reports that epoch again.
    third = run_training(TrainConfig(epochs=3, resume=True, **base), quiet=True)
    assert third["restarts"] == [2, 3] and third["history"] == second["history"]
    assert third["test_accuracy"] == second["test_accuracy"] and third["best_epoch"] == second["best_epoch"]
    with pytest.raises(UserError, match="is ResNet-20 v1, but this run is ResNet-32 v1"):
        run_training(TrainConfig(epochs=4, resume=True, depth=32, **base), quiet=True)
    # A resume keeps the recipe: another LR, val split or seed, or fewer epochs, is refused before any work.
    for changed, says in ((dict(lr=2e-3), "--lr 0.001 (not 0.002)"), (dict(seed=1), "--seed 0 (not 1)"),
                          (dict(weight_decay=0.0), "--weight-decay 0.0001 (not 0.0)"),
                          (dict(epochs=2), "--epochs 3 or more (not 2)")):
        with pytest.raises(UserError, match=re.escape(says)):
            run_training(TrainConfig(resume=True, **{"epochs": 4, **base, **changed}), quiet=True)
    with pytest.raises(UserError, match=re.escape("--val-size 100 (not 200)")):
        run_training(TrainConfig(epochs=4, resume=True, **{**base, "val_size": 200}), quiet=True)
    # How it runs may change: precision, workers, more epochs.
    fourth = run_training(TrainConfig(epochs=4, resume=True, precision="fp32", **base), quiet=True)
    assert [h["epoch"] for h in fourth["history"]] == [1, 2, 3, 4] and fourth["restarts"] == [2, 3]


def test_a_run_restored_at_its_last_epoch_still_reports_it(tmp_path, mini_dir):
    """A run restored from its final epoch's checkpoint (a sweep trial whose driver died just after writing it)
    trains nothing, yet Ray's result, which Tune's trial is judged by, still carries that epoch's metrics."""
    from distributed_resnet.driver import build_trainer, data_refs, load_data, run_training

    base = dict(num_workers=0, data_dir=mini_dir, storage_path=str(tmp_path), name="done", max_train_samples=256,
                val_size=100, epochs=2)
    first = run_training(TrainConfig(**base), quiet=True)
    cfg = TrainConfig(resume=True, **base)
    data = load_data(cfg)
    loop_config = {"config": cfg.to_dict(), "data": data_refs(data, lambda a: a), "val_is_test": data.val_is_test,
                   "local_run_dir": str(tmp_path / "done")}
    result = build_trainer(cfg, str(tmp_path), loop_config).fit()
    assert result.metrics["epoch"] == 2 and result.metrics["val_accuracy"] == first["history"][-1]["val_accuracy"]
    assert result.return_value["restarts"] == [2] and result.return_value["history"] == first["history"]


def test_same_seed_same_run(tmp_path, mini_dir):
    """--seed fixes the initial weights, the split, the data order and the augmentation: two runs are identical."""
    import torch

    from distributed_resnet.driver import run_training

    runs = []
    for name in ("s1", "s2"):
        cfg = TrainConfig(num_workers=0, epochs=1, data_dir=mini_dir, storage_path=str(tmp_path), name=name,
                          max_train_samples=256, val_size=100, seed=3)
        results = run_training(cfg, quiet=True)
        state = torch.load(tmp_path / name / "checkpoint_epoch_0001" / "checkpoint.pt", weights_only=False)
        timings = ("seconds", "per_second", "ended_at")
        runs.append(({k: v for k, v in results["history"][0].items() if not any(t in k for t in timings)},
                     state["model"]))
    (m1, w1), (m2, w2) = runs
    assert m1 == m2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    other = run_training(TrainConfig(num_workers=0, epochs=1, data_dir=mini_dir, storage_path=str(tmp_path), name="s3",
                                     max_train_samples=256, val_size=100, seed=4), quiet=True)
    assert other["history"][0]["train_loss"] != m1["train_loss"]


def test_export_publishes_weights_that_reproduce_the_run(tmp_path, mini_dir):
    """`export` writes weights only (no optimizer), results, curves and an evaluation that matches the run exactly."""
    import distributed_resnet
    from distributed_resnet.export import export_run
    from distributed_resnet.driver import run_training

    results = run_training(TrainConfig(num_workers=0, epochs=1, data_dir=mini_dir, storage_path=str(tmp_path),
                                       name="run", max_train_samples=256, val_size=100), quiet=True)
    out = tmp_path / "published"
    evaluation = export_run(str(tmp_path / "run"), str(out), mini_dir)
    assert evaluation["test_accuracy"] == results["test_accuracy"]
    assert {p.name for p in out.iterdir()} == {"checkpoint.pt", "meta.json", "results.json", "curves.png", "eval.json",
                                                "eval_confusion.png"}
    import torch

    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert set(state) == {"format", "model", "meta"} and (out / "checkpoint.pt").stat().st_size < 1.3e6
    model = distributed_resnet.load_pretrained(str(out))
    assert not model.training and model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(UserError, match="already exists"):
        export_run(str(tmp_path / "run"), str(out), mini_dir)


def test_test_every_skips_test_between_and_still_reports_the_best_checkpoints(tmp_path, mini_dir):
    """--test-every 2 over 3 epochs: test at epochs 2 and 3 (the last) only; the run's test accuracy is still the
    best-val checkpoint's, evaluated at the end if its epoch had none."""
    from distributed_resnet.driver import run_training
    from distributed_resnet.evaluate import evaluate_checkpoint

    results = run_training(TrainConfig(num_workers=0, epochs=3, test_every=2, data_dir=mini_dir, val_size=100,
                                       max_train_samples=256, storage_path=str(tmp_path), name="sparse"), quiet=True)
    assert [h["test_accuracy"] is not None for h in results["history"]] == [False, True, True]
    best = evaluate_checkpoint(results["best_checkpoint"], mini_dir)
    assert results["test_accuracy"] == best["test_accuracy"]
    assert (tmp_path / "sparse" / "curves.png").stat().st_size > 0
    with pytest.raises(UserError, match="--test-every must be a positive integer"):
        TrainConfig(test_every=0).validate()
