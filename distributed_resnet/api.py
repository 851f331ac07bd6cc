"""The Python face, for notebooks and scripts: `fit` and `sweep` return Ray's own result objects.

    from distributed_resnet import TrainConfig, fit, sweep
    result = fit(TrainConfig(recipe="fast", num_workers=2))
    result.metrics, result.checkpoint, result.best_checkpoints, result.path, result.summary
    grid = sweep("tune_configs/smoke.yaml", data_dir="../shared/cifar10/mini")
    best = grid.get_best_result("val_accuracy", "max", scope="all")
    ray.train.Checkpoint(best.metrics["checkpoint_path"])   # Ray Train in Tune reports its checkpoint's path

The command lines (`train`, `tune`) are thin callers of the same functions.
"""

from __future__ import annotations

import dataclasses
import time

import ray.train

from .config import TrainConfig


@dataclasses.dataclass
class TrainResult(ray.train.Result):
    """Ray Train's `Result` of the run, plus `summary`: what `results.json` in its folder holds (the best-by-val
    checkpoint and its test accuracy, the history, the resolved config, speed)."""

    summary: dict = dataclasses.field(default_factory=dict)


def fit(config: TrainConfig, address: str | None = None, verbose: bool = False, quiet: bool = True) -> TrainResult:
    """Train one run of `config` (validated first) with Ray Train; `quiet=False` prints the per-epoch lines."""
    from .driver import fit_run

    result, summary = fit_run(config.validate(), address=address, verbose=verbose, quiet=quiet)
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.init}
    return TrainResult(**fields, summary=summary)


def sweep(config_path: str, data_dir: str | None = None, storage_path: str = "~/ray_results", name: str | None = None,
          num_samples: int | None = None, resume: bool = False, address: str | None = None, verbose: bool = False,
          resources: dict | None = None):
    """Run the sweep file at `config_path`; returns Ray Tune's `ResultGrid`. `resources` replaces the file's
    num_workers, cpus_per_worker, gpus_per_worker or max_concurrent_trials (the `tune` flags of those names; not
    with `resume`). Each trial's results carry its Ray Train checkpoint as `metrics["checkpoint_path"]` (Ray's
    TuneReportCallback). best.json and trials.json (the winner, evaluated once on test, and every trial against
    the default recipe) land in the sweep's folder. With a `confirm:` section the returned grid's
    `.confirmation` is the confirmation stage's own ResultGrid (one result per configuration and seed; else None),
    and best.json's `confirmation` holds the medians, spreads and verdict."""
    from .sweeps.spec import load_sweep, refuse_new_layout_on_resume
    from .sweeps.summary import write_summary
    from .sweeps.tuner import run_sweep

    refuse_new_layout_on_resume(resources, resume)
    spec = load_sweep(config_path, resources)
    name = name or spec.get("name") or f"tune_{time.strftime('%Y%m%d-%H%M%S')}"
    grid, summary = run_sweep(spec, data_dir, storage_path, name, num_samples, resume, address, verbose)
    if summary.get("best") is not None:
        write_summary(summary)
    return grid
