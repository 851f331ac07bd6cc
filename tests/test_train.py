"""End-to-end training with real Ray Train on the real (mini) CIFAR-10, as a user runs it."""

import json

import pytest

from conftest import run_cli
from distributed_resnet.config import TrainConfig, UserError

RESULT_KEYS = {"test_accuracy", "final_test_accuracy", "best_val_accuracy", "best_epoch", "epochs", "num_workers",
               "device", "wall_seconds", "train_images_per_second", "parameters", "config", "best_checkpoint",
               "restarts"}


def test_two_ray_workers_train_and_evaluate_reproduces(tmp_path, mini_dir):
    """The README's command: 2 CPU workers, 2 epochs on mini; then `evaluate` on the best checkpoint."""
    proc = run_cli("train", "--num-workers", "2", "--epochs", "2", "--data-dir", mini_dir,
                   "--storage-path", str(tmp_path), "--name", "a")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    epoch_lines = [l for l in proc.stdout.splitlines() if l.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all(k in epoch_lines[0] for k in ("lr", "loss", "val", "test", "img/s", "ETA"))
    assert "best checkpoint:" in proc.stdout

    run = tmp_path / "a"
    results = json.loads((run / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert results["epochs"] == 2 and results["num_workers"] == 2 and results["device"] == "cpu"
    assert results["parameters"] == 273_066 and results["restarts"] == []
    assert results["config"]["batch_size"] == 128 and results["config"]["lr_policy"] == "keras"
    assert len(results["worker_nodes"]) == 2
    history = results["history"]
    assert history[1]["train_loss"] < history[0]["train_loss"]  # it learns
    best = max(history, key=lambda h: (h["val_accuracy"], -h["epoch"]))
    assert results["best_epoch"] == best["epoch"] and results["test_accuracy"] == best["test_accuracy"]
    assert results["final_test_accuracy"] == history[-1]["test_accuracy"]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = results["best_checkpoint"]
    assert ckpt.startswith(str(run)) and (tmp_path / ckpt / "checkpoint.pt").is_file()

    out = tmp_path / "eval" / "eval.json"
    proc = run_cli("evaluate", "--checkpoint", ckpt, "--data-dir", mini_dir, "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads(out.read_text())
    assert evaluated["test_accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-9)
    assert set(evaluated["per_class_accuracy"]) == {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                    "horse", "ship", "truck"}
    assert sum(map(sum, evaluated["confusion_matrix"])) == 500
    assert (tmp_path / "eval" / "eval_confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "test accuracy" in proc.stdout


def test_local_mode_runs_in_process_and_resumes(tmp_path, mini_dir):
    """--num-workers 0: the loop runs in this process; checkpoints land in the run folder; --resume continues."""
    from distributed_resnet.run import run_training

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
    with pytest.raises(UserError, match="is ResNet-20 v1, but this run is ResNet-32 v1"):
        run_training(TrainConfig(epochs=4, resume=True, depth=32, **base), quiet=True)
