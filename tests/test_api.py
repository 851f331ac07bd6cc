"""The Python face as a notebook uses it: `fit` and `sweep` return Ray's own result objects, read here through
Ray's API only (metrics, checkpoints, paths), on one in-process Ray cluster."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO


@pytest.fixture(scope="module")
def ray_here():
    import ray

    from distributed_resnet.run import init_ray

    init_ray(extra_cpus=1)  # 2 CPUs for the Train workers, 1 for the trial drivers: as `tune` starts it
    yield
    ray.shutdown()


def test_fit_returns_ray_trains_result(ray_here, tmp_path, mini_dir):
    import ray.train

    from distributed_resnet import TrainConfig, fit, load_pretrained

    result = fit(TrainConfig(recipe="fast", num_workers=2, epochs=2, data_dir=mini_dir, storage_path=str(tmp_path),
                             name="nb", max_train_samples=256, val_size=100))
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
    assert result.summary["config"]["recipe"] == "fast"


def test_sweep_returns_tunes_result_grid(ray_here, tmp_path, mini_dir):
    import ray.train
    from ray.tune import ResultGrid

    from distributed_resnet import sweep

    spec = yaml.safe_load((REPO / "tune_configs" / "smoke.yaml").read_text())
    spec["fixed"].update(epochs=1, max_train_samples=256, val_size=100)
    spec["num_samples"] = 2
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    grid = sweep(str(path), data_dir=mini_dir, storage_path=str(tmp_path), name="nb")
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
