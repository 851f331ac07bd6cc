"""The Python face as a notebook uses it: `fit` and `sweep` return Ray's own result objects, read here through
Ray's API only (metrics, checkpoints, paths), on one in-process Ray cluster; and what a run leaves in its folder."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli

RESULT_KEYS = {"test_accuracy", "final_test_accuracy", "best_val_accuracy", "best_epoch", "epochs", "num_workers",
               "device", "wall_seconds", "train_images_per_second", "parameters", "config", "best_checkpoint",
               "restarts", "history"}


@pytest.fixture(scope="module")
def ray_here():
    import ray

    from distributed_resnet.driver import init_ray

    init_ray(extra_cpus=1)  # 2 CPUs for the Train workers, 1 for the trial drivers: as `tune` starts it
    yield
    ray.shutdown()


def test_fit_returns_ray_trains_result(ray_here, tmp_path, mini_dir):
    import ray.train

    from distributed_resnet import TrainConfig, fit, load_pretrained

    result = fit(TrainConfig(recipe="fast", num_workers=2, epochs=2, data_dir=mini_dir, storage_path=str(tmp_path),
                             name="nb", max_train_samples=256, val_size=100,
                             lr=0.02))  # 4 steps at the preset's peak of 0.15 overshoot
    assert isinstance(result, ray.train.Result) and result.error is None
    assert result.metrics["epoch"] == 2 and Path(result.path) == tmp_path / "nb"
    scored = [(c, m) for c, m in result.best_checkpoints if m.get("val_accuracy") == m.get("val_accuracy")]
    best, metrics = max(scored, key=lambda cm: (cm[1]["val_accuracy"], cm[1]["epoch"]))
    with best.as_directory() as folder:
        model = load_pretrained(folder)
    assert not model.training
    with result.checkpoint.as_directory() as folder:  # the latest
        assert json.loads((Path(folder) / "meta.json").read_text())["epoch"] == 2
    # The project's summary beside it: the best-by-val checkpoint is Ray's best.
    assert Path(result.summary["best_checkpoint"]).name == Path(best.path).name
    assert result.summary["test_accuracy"] == metrics["test_accuracy"]

    # What the run leaves in its folder: results.json, the curves, TensorBoard scalars; `evaluate` reproduces it.
    run = tmp_path / "nb"
    results = json.loads((run / "results.json").read_text())
    assert RESULT_KEYS <= set(results) and results == result.summary
    assert results["epochs"] == 2 and results["num_workers"] == 2 and results["device"] == "cpu"
    assert results["parameters"] == 273_066 and results["restarts"] == [] and len(results["worker_nodes"]) == 2
    assert results["config"]["recipe"] == "fast" and results["config"]["lr_policy"] == "onecycle"
    assert results["config"]["lr"] == 0.02 and results["config"]["optimizer"] == "sgd"  # the override wins
    assert results["config"]["batch_size"] == 128
    history = results["history"]
    assert history[1]["train_loss"] < history[0]["train_loss"]  # it learns
    best_row = max(history, key=lambda h: (h["val_accuracy"], h["epoch"]))  # ties: the later epoch, as Ray keeps it
    assert results["best_epoch"] == best_row["epoch"] and results["test_accuracy"] == best_row["test_accuracy"]
    assert results["best_checkpoint"].startswith(str(run))
    assert results["final_test_accuracy"] == history[-1]["test_accuracy"]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from tensorboard_reader import scalars

    tb = scalars(run)  # `tensorboard --logdir <storage-path>`
    assert [e for e, _ in tb["accuracy/val"]] == [1, 2]
    assert [v for _, v in tb["accuracy/val"]] == pytest.approx([h["val_accuracy"] for h in history])
    assert {"loss/train", "loss/test", "lr", "speed/images_per_second"} <= set(tb)

    out = tmp_path / "eval" / "eval.json"
    proc = run_cli("evaluate", "--checkpoint", results["best_checkpoint"], "--data-dir", mini_dir, "--output", str(out))
    assert proc.returncode == 0 and "test accuracy" in proc.stdout, proc.stderr
    evaluated = json.loads(out.read_text())
    assert evaluated["test_accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-9)
    assert set(evaluated["per_class_accuracy"]) == {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                    "horse", "ship", "truck"}
    assert sum(map(sum, evaluated["confusion_matrix"])) == 500
    assert (tmp_path / "eval" / "eval_confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_returns_tunes_result_grid(ray_here, tmp_path, mini_dir, capfd):
    """An Optuna TPE sweep under ASHA, 2 trials at once; the first trial is the default recipe, enqueued."""
    import re

    import ray.train
    from ray.tune import ResultGrid

    from distributed_resnet import sweep

    spec = yaml.safe_load((REPO / "tune_configs" / "smoke.yaml").read_text())
    spec["fixed"].update(epochs=1, max_train_samples=256, val_size=100)  # ASHA on, nothing to stop in 1 epoch
    spec.update(num_samples=2, max_concurrent_trials=2, search_alg={"type": "optuna", "seed": 1, "n_startup_trials": 1})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    grid = sweep(str(path), data_dir=mini_dir, storage_path=str(tmp_path), name="nb")
    out = capfd.readouterr().out
    assert isinstance(grid, ResultGrid) and len(grid) == 2 and not grid.errors
    best = grid.get_best_result("val_accuracy", "max", scope="all")
    # A Ray Train run inside a trial hands Tune its checkpoint's path (Ray's TuneReportCallback), not a copy.
    assert best.metrics["epoch"] == 1 and best.metrics["checkpoint_path"]
    with ray.train.Checkpoint(best.metrics["checkpoint_path"]).as_directory() as folder:
        assert (Path(folder) / "checkpoint.pt").is_file()
    # best.json (the project's pick, the later epoch on ties) agrees with Ray's best result.
    summary = json.loads((tmp_path / "nb" / "best.json").read_text())
    assert summary["trial_id"] in {r.metrics["trial_id"] for r in grid}
    assert summary["val_accuracy"] == best.metrics["val_accuracy"] == max(r.metrics["val_accuracy"] for r in grid)

    # One progress line per trial, Tune's own tables off.
    assert "Trial status" not in out
    lines = [line for line in out.splitlines() if re.match(r"\[\d/2\] trial ", line)]
    assert len(lines) == 2 and sum(" (default) " in line for line in lines) == 1, out
    assert all(re.search(r" finished: 1/1 epochs, best val_accuracy \d", line) for line in lines), lines
    trials = json.loads((tmp_path / "nb" / "trials.json").read_text())
    default = [t for t in trials if t["default"]]
    assert len(trials) == 2 and len(default) == 1 and summary["default_trial_id"] == default[0]["trial_id"]
    # plateau_patience 5 lies outside randint [1, 3]: Optuna still runs it (numeric values may be enqueued outside)
    assert default[0]["config"] == {"lr": 1e-3, "lr_policy": "keras", "plateau_patience": 5}
    assert list((tmp_path / "nb").glob(f"run_trial_{default[0]['trial_id']}_1_*"))  # the first trial Optuna made
    other = next(t for t in trials if not t["default"])
    assert 1e-4 <= other["config"]["lr"] <= 1e-2 and 1 <= other["config"]["plateau_patience"] <= 3
