"""`python -m distributed_resnet.tune --config tune_configs/<file>.yaml`: a Ray Tune sweep of the recipe.

Each trial is a Tune function trainable that builds the project's `TorchTrainer` and calls `fit()` with Ray
Train's `TuneReportCallback` (the Ray Train V2 pattern: `Tuner(TorchTrainer)` is gone). Trials report
every epoch, ASHA stops the weak ones on validation accuracy, and at the end the best trial's best
checkpoint is evaluated once on the test set: test accuracy never takes part in the selection.

The YAML (see tune_configs/): `num_samples`, `max_concurrent_trials`, `metric`/`mode`, `resources`
(`num_workers`, `cpus_per_worker`, `gpus_per_worker` per trial; fractional GPUs let trials share one),
`scheduler` (ASHA), `fixed` (any training setting) and `search` (any training setting, as
`{loguniform: [lo, hi]}`, `{uniform: [lo, hi]}`, `{randint: [lo, hi]}`, `{choice: [...]}` or `{grid: [...]}`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .cli import Parser, main_guard
from .config import TrainConfig, UserError
from .data import default_data_dir

TOP_KEYS = {"name", "num_samples", "max_concurrent_trials", "metric", "mode", "resources", "scheduler", "fixed",
            "search", "max_failures"}
RESOURCE_KEYS = {"num_workers", "cpus_per_worker", "gpus_per_worker"}
SCHEDULER_KEYS = {"type", "grace_period", "reduction_factor"}
DISTRIBUTIONS = {"loguniform", "uniform", "randint", "choice", "grid"}


def load_sweep(path: str) -> dict:
    """Read and check a sweep YAML; every mistake is a one-line UserError naming the key."""
    import yaml

    try:
        spec = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"no sweep config at {path}; see tune_configs/ for examples")
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}")
    if not isinstance(spec, dict):
        raise UserError(f"{path} must be a mapping of sweep settings")
    _known(spec, TOP_KEYS, path, "")
    _known(spec.get("resources") or {}, RESOURCE_KEYS, path, "resources.")
    _known(spec.get("scheduler") or {}, SCHEDULER_KEYS, path, "scheduler.")
    fields = set(TrainConfig.__dataclass_fields__)
    for section in ("fixed", "search"):
        _known(spec.get(section) or {}, fields - {"num_workers", "cpus_per_worker", "gpus_per_worker"}, path, f"{section}.")
    for key, dist in (spec.get("search") or {}).items():
        if not (isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in DISTRIBUTIONS):
            raise UserError(f"{path}: search.{key} must be one of {{{', '.join(sorted(DISTRIBUTIONS))}: ...}}, got {dist!r}")
        kind, args = next(iter(dist.items()))
        if kind in ("loguniform", "uniform", "randint") and not (isinstance(args, list) and len(args) == 2
                                                                  and args[0] < args[1]):
            raise UserError(f"{path}: search.{key}.{kind} needs [low, high] with low < high, got {args!r}")
        if kind in ("choice", "grid") and not (isinstance(args, list) and args):
            raise UserError(f"{path}: search.{key}.{kind} needs a non-empty list, got {args!r}")
    if (spec.get("scheduler") or {}).get("type", "asha") not in ("asha", "none"):
        raise UserError(f"{path}: scheduler.type must be 'asha' or 'none'")
    if spec.get("mode", "max") not in ("max", "min"):
        raise UserError(f"{path}: mode must be 'max' or 'min'")
    # Check that every corner of the space makes a valid training config.
    base = trial_config(spec, {})
    for key, dist in (spec.get("search") or {}).items():
        kind, args = next(iter(dist.items()))
        for value in args:  # the choices, or both ends of a range
            TrainConfig.from_dict({**base, key: value}).validate()
    return spec


def _known(section: dict, allowed: set, path: str, prefix: str) -> None:
    if not isinstance(section, dict):
        raise UserError(f"{path}: {prefix.rstrip('.') or 'the file'} must be a mapping")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(prefix + k for k in unknown)}; "
                        f"allowed: {', '.join(sorted(allowed))}")


def trial_config(spec: dict, sampled: dict) -> dict:
    """Training settings of one trial: defaults < fixed < resources < sampled values."""
    res = spec.get("resources") or {}
    values = {**(spec.get("fixed") or {}), "num_workers": res.get("num_workers", 1),
              "cpus_per_worker": res.get("cpus_per_worker", 1), "gpus_per_worker": res.get("gpus_per_worker", 0),
              "report_test": False, **sampled}
    values["use_gpu"] = values["gpus_per_worker"] > 0
    return values


def search_space(spec: dict) -> dict:
    from ray import tune

    make = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
            "randint": lambda a: tune.randint(a[0], a[1] + 1),  # inclusive high, as people read [2, 10]
            "choice": tune.choice, "grid": tune.grid_search}
    return {key: make[kind](args) for key, dist in (spec.get("search") or {}).items() for kind, args in dist.items()}


def run_trial(sampled: dict, spec: dict, data: dict, val_is_test: bool, trials_root: str) -> None:
    """One trial: the project's TorchTrainer, reporting every epoch to Tune through Ray Train's callback."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .run import build_trainer

    values = trial_config(spec, sampled)
    values["name"] = ray.tune.get_context().get_trial_id()  # a restarted trial finds its own Ray Train run again
    cfg = TrainConfig.from_dict({**values, "storage_path": trials_root}).validate()
    loop_config = {"config": cfg.to_dict(), "data": data, "val_is_test": val_is_test}
    build_trainer(cfg, trials_root, loop_config, callbacks=[TuneReportCallback()]).fit()


def run_sweep(spec: dict, data_dir: str | None, storage_path: str, name: str, num_samples: int | None = None,
              resume: bool = False, address: str | None = None, verbose: bool = False) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from .run import data_refs, guard_folder, init_ray, load_data, storage_root

    root = storage_root(storage_path)
    exp_path = guard_folder(root, name, resume, "sweep")
    fixed = dict(spec.get("fixed") or {})
    if data_dir:
        fixed["data_dir"] = data_dir
    spec = {**spec, "fixed": fixed}
    base = TrainConfig.from_dict(trial_config(spec, {}))
    data = load_data(base)
    metric, mode = spec.get("metric", "val_accuracy"), spec.get("mode", "max")
    init_ray(address, verbose, extra_cpus=1)  # room for the trial drivers on a local cluster
    refs = data_refs(data, ray.put)
    trainable = tune.with_parameters(run_trial, spec=spec, data=refs, val_is_test=data.val_is_test,
                                     trials_root=f"{exp_path}/trials")
    # The trial function only waits on fit(): the Train workers hold the real CPUs and GPUs.
    trainable = tune.with_resources(trainable, {"CPU": 0.01})
    t0 = time.time()
    if resume:
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        sched_spec = spec.get("scheduler") or {}
        scheduler = FIFOScheduler() if sched_spec.get("type", "asha") == "none" else ASHAScheduler(
            time_attr="epoch", max_t=base.epochs, grace_period=min(base.epochs, sched_spec.get("grace_period", 1)),
            reduction_factor=sched_spec.get("reduction_factor", 2))
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(spec),
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler,
                                        num_samples=num_samples or spec.get("num_samples", 1),
                                        max_concurrent_trials=spec.get("max_concurrent_trials")),
            run_config=tune.RunConfig(name=name, storage_path=root, verbose=1 if verbose else 0,
                                      failure_config=tune.FailureConfig(max_failures=spec.get("max_failures", 0))),
        )
    grid = tuner.fit()
    return summarize_sweep(grid, spec, metric, mode, base, exp_path, time.time() - t0)


def summarize_sweep(grid, spec, metric, mode, base: TrainConfig, exp_path: str, seconds: float) -> dict:
    """Trials sorted by their best `metric`; the best trial's best checkpoint, evaluated once on test."""
    import ray.train

    from .evaluate import evaluate_checkpoint

    searched = list((spec.get("search") or {}).keys())
    sign = 1 if mode == "max" else -1
    trials = []
    for result in grid:
        df = result.metrics_dataframe
        row = {"trial_id": (result.metrics or {}).get("trial_id") or Path(result.path).name,
               "config": {k: result.config.get(k) for k in searched}, "epochs": 0, metric: None,
               "best_epoch": None, "checkpoint": None,
               "status": "error" if result.error else "done"}
        if result.error:
            row["error"] = str(result.error).strip().splitlines()[-1][:200]
        if df is not None and metric in df and df[metric].notna().any():
            best = df.loc[(sign * df[metric]).idxmax()]
            row.update({"epochs": int(df["epoch"].max()), metric: float(best[metric]), "best_epoch": int(best["epoch"]),
                        "checkpoint": best.get("checkpoint_path")})
        trials.append(row)
    trials.sort(key=lambda r: -math.inf if r[metric] is None else sign * r[metric], reverse=True)
    best = next((t for t in trials if t["checkpoint"]), None)
    out = {"experiment_path": exp_path, "wall_seconds": seconds, "metric": metric, "trials": trials}
    if best is not None:
        with ray.train.Checkpoint(best["checkpoint"]).as_directory() as folder:
            test = evaluate_checkpoint(folder, base.data_dir)
        out["best"] = {"trial_id": best["trial_id"], "config": {**trial_config(spec, {}), **best["config"]},
                       "val_accuracy": best[metric] if metric == "val_accuracy" else None, metric: best[metric],
                       "best_epoch": best["best_epoch"], "checkpoint": best["checkpoint"],
                       "test_accuracy": test["test_accuracy"]}
    return out


def print_table(summary: dict) -> None:
    metric, trials = summary["metric"], summary["trials"]
    keys = sorted({k for t in trials for k in t["config"]})
    head = f"{'trial':<14}" + "".join(f"{k[:16]:>17}" for k in keys) + f"{'epochs':>7}{metric:>14}  status"
    print(head)
    for t in trials:
        cells = "".join(f"{_fmt(t['config'].get(k)):>17}" for k in keys)
        value = "-" if t[metric] is None else f"{100 * t[metric]:.2f}%" if "accuracy" in metric else f"{t[metric]:.4f}"
        print(f"{t['trial_id'][:13]:<14}{cells}{t['epochs']:>7}{value:>14}  {t['status']}"
              + (f" ({t['error']})" if t.get("error") else ""))


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    p = Parser(prog="python -m distributed_resnet.tune", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="sweep YAML (see tune_configs/)")
    p.add_argument("--data-dir", default=None, help="overrides fixed.data_dir (default: the YAML's, else $CIFAR10_DIR)")
    p.add_argument("--storage-path", default="~/ray_results", help="local folder or s3:// URI (default %(default)s)")
    p.add_argument("--name", default=None, help="sweep folder (default: the YAML's name, else tune_<time>)")
    p.add_argument("--num-samples", type=int, default=None, help="trials to sample (default: the YAML's)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are kept")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: start a local one)")
    p.add_argument("--verbose", action="store_true", help="show Tune's and Ray's own progress output")
    args = p.parse_args(argv)
    spec = load_sweep(args.config)
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples must be a positive integer, got {args.num_samples}")
    data_dir = args.data_dir or (None if (spec.get("fixed") or {}).get("data_dir") else default_data_dir())
    name = args.name or spec.get("name") or f"tune_{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"sweep {name}: {args.num_samples or spec.get('num_samples', 1)} trials from {args.config}", flush=True)
    summary = run_sweep(spec, data_dir, args.storage_path, name, args.num_samples, args.resume, args.address,
                        args.verbose)
    print_table(summary)
    best = summary.get("best")
    path = f"{summary['experiment_path']}/best.json"
    if best is None:
        print("no trial produced a checkpoint", flush=True)
        return 1
    from .run import write_file

    write_file(summary["experiment_path"], "best.json", json.dumps(best, indent=1).encode())
    write_file(summary["experiment_path"], "trials.json", json.dumps(summary["trials"], indent=1).encode())
    print(f"best trial {best['trial_id']}: val accuracy {100 * best[summary['metric']]:.2f}% at epoch "
          f"{best['best_epoch']}, test accuracy {100 * best['test_accuracy']:.2f}% (evaluated once, after selection)")
    print(f"best config and checkpoint: {path}  ({summary['wall_seconds']:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    main_guard(main)
