"""`python -m distributed_resnet.tune --config tune_configs/<file>.yaml`: a Ray Tune sweep of the recipe.

Each trial is a Tune function trainable that builds the project's `TorchTrainer` and calls `fit()` with Ray
Train's `TuneReportCallback` (the Ray Train V2 pattern: `Tuner(TorchTrainer)` is gone). Trials report
every epoch, ASHA stops the weak ones on validation accuracy, and at the end the best trial's best
checkpoint is evaluated once on the test set: test accuracy never takes part in the selection.

The YAML (see tune_configs/):
- `num_samples`: trials, the default-recipe trial included (see below); `max_concurrent_trials`; `metric`/`mode`;
  `max_failures` (Tune's retries of a failed trial).
- `resources`: `num_workers`, `cpus_per_worker`, `gpus_per_worker` per trial (fractional GPUs let trials share one).
- `fixed`: any training setting; `search`: any training setting, as `{loguniform: [lo, hi]}`, `{uniform: [lo, hi]}`,
  `{randint: [lo, hi]}` (inclusive), `{choice: [...]}` or `{grid: [...]}`.
- `search_alg`: `{type: random}` (the default: Tune's BasicVariantGenerator) or `{type: optuna}` (Optuna's TPE, through
  `OptunaSearch`; needs `pip install 'distributed-resnet[tune]'`; no `grid`); `seed` (default 0) seeds the sampler;
  `n_startup_trials` (optuna only, Optuna's default 10): random suggestions before TPE models the results.
- `scheduler`: `{type: asha, grace_period, reduction_factor}` (the default), `{type: none}`, or
  `{type: pbt, perturbation_interval, mutate, quantile_fraction, resample_probability, synch}` (see PBT below).

The default recipe is always a trial: the first trial evaluates the default value of every searched key
(TrainConfig's default, or the YAML's `fixed` value), through `points_to_evaluate` of either searcher. It counts
in `num_samples` (16 = the default + 15 sampled); with `grid` keys the grid runs `num_samples` times and the default
comes on top. A default outside its search range is still evaluated (a note says so; with optuna a default
missing from a `choice` list joins the list). The final table marks that trial with `*`; trials.json gives each
trial's `vs_default` (its best metric minus the default's), best.json says by how much the winner beats the
default (`beats_default_by`, positive = better) or that it does not.

Progress: one line per trial as it ends (finished, stopped by ASHA, or error), from a Tune callback; Tune's own
tables stay off unless --verbose. A trial whose loss turns non-finite ends as an error with the loop's message.
ASHA never stops a trial at its last epoch (it ends by itself, releasing its Train workers at once); a trial it
stops earlier is killed mid-run, and its workers' placement group is freed by Ray's PlacementGroupCleaner, which
needs the dashboard and fails when several Ray instances share one machine (their CPUs then stay taken).

Population Based Training (`scheduler: {type: pbt}`) mutates `lr` and/or plateau settings (`mutate`, each also in
`search`, whose range bounds the mutations) every `perturbation_interval` epochs. `TuneReportCallback` forwards
only a checkpoint *path*, so PBT would find no Tune checkpoint to copy; instead a PBT trial trains segment by
segment: each segment is a fresh Ray Train run of `perturbation_interval` epochs (`epochs` set to the segment's
end, `schedule_epochs` unchanged, so the LR steps stay put) that starts from `ray.tune.get_checkpoint()` handed
to the loop as `resume_from`, and its last epoch reports the segment's checkpoint with `ray.tune.report`. An
exploit thus restores the better trial's weights, Adam state and plateau state, while the LR policy's settings
(`lr`, `plateau_*`) come from the mutated config: the loop takes them from the config, only the plateau state
from the checkpoint. Costs: a worker-group start per segment, and the Tune checkpoint is a folder the Train
workers read directly, so PBT needs a local storage path (one machine, or a shared file system), not s3://.
`synch: true` waits for the whole population at every interval (each exploit is certain; trials idle meanwhile).
The whole population trains at once: `max_concurrent_trials` must be at least the number of trials.
"""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from pathlib import Path

from . import checkpoint as ckpt
from .cli import Parser, main_guard
from .config import TrainConfig, UserError
from .data import default_data_dir

TOP_KEYS = {"name", "num_samples", "max_concurrent_trials", "metric", "mode", "resources", "scheduler", "fixed",
            "search", "search_alg", "max_failures"}
RESOURCE_KEYS = {"num_workers", "cpus_per_worker", "gpus_per_worker"}
SCHEDULER_KEYS = {
    "asha": {"type", "grace_period", "reduction_factor"},
    "pbt": {"type", "perturbation_interval", "mutate", "quantile_fraction", "resample_probability", "synch"},
    "none": {"type"},
}
SEARCH_ALG_KEYS = {"random": {"type", "seed"}, "optuna": {"type", "seed", "n_startup_trials"}}
DISTRIBUTIONS = {"loguniform", "uniform", "randint", "choice", "grid"}
# What PBT may change during a trial: the settings the loop reads from the config at every (re)start, rather
# than from the checkpoint (Adam's own hyperparameters, weight decay included, are restored from it).
MUTABLE = ("lr", "lr_policy", "plateau_factor", "plateau_patience", "plateau_cooldown", "plateau_min_lr",
           "plateau_min_delta")
DRIVER_CPU = 0.01  # a trial's own process only waits on fit(): the Train workers hold the real CPUs and GPUs


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
    fields = set(TrainConfig.__dataclass_fields__)
    for section in ("fixed", "search"):
        _known(spec.get(section) or {}, fields - {"num_workers", "cpus_per_worker", "gpus_per_worker"}, path, f"{section}.")
    # The driver loads fixed.init_weights once, for the base architecture, and hands it to every trial.
    clash = sorted({"init_weights", "depth", "version", "padding"} & set(spec.get("search") or {}))
    if clash and ("init_weights" in clash or (spec.get("fixed") or {}).get("init_weights")):
        raise UserError(f"{path}: search.{clash[0]} cannot vary with init_weights (one set of weights, of one "
                        f"architecture, starts every trial): fix it, or drop init_weights")
    for key, dist in (spec.get("search") or {}).items():
        if not (isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in DISTRIBUTIONS):
            raise UserError(f"{path}: search.{key} must be one of {{{', '.join(sorted(DISTRIBUTIONS))}: ...}}, got {dist!r}")
        kind, args = next(iter(dist.items()))
        if kind in ("loguniform", "uniform", "randint") and not (isinstance(args, list) and len(args) == 2
                                                                  and args[0] < args[1]):
            raise UserError(f"{path}: search.{key}.{kind} needs [low, high] with low < high, got {args!r}")
        if kind in ("choice", "grid") and not (isinstance(args, list) and args):
            raise UserError(f"{path}: search.{key}.{kind} needs a non-empty list, got {args!r}")
    if spec.get("mode", "max") not in ("max", "min"):
        raise UserError(f"{path}: mode must be 'max' or 'min'")
    _check_int(path, "num_samples", spec.get("num_samples", 1), 1)
    if spec.get("max_concurrent_trials") is not None:
        _check_int(path, "max_concurrent_trials", spec["max_concurrent_trials"], 1)
    # Check that the default trial and every corner of the space make valid training configs.
    base = trial_config(spec, {})
    TrainConfig.from_dict(base).validate()
    for key, dist in (spec.get("search") or {}).items():
        kind, args = next(iter(dist.items()))
        for value in args:  # the choices, or both ends of a range
            TrainConfig.from_dict({**base, key: value}).validate()
    alg = _check_search_alg(spec, path)
    _check_scheduler(spec, path, alg["type"], TrainConfig.from_dict(base).epochs)
    return spec


def _check_search_alg(spec: dict, path: str) -> dict:
    alg = search_alg_spec(spec)
    if alg["type"] not in SEARCH_ALG_KEYS:
        raise UserError(f"{path}: search_alg.type must be 'random' or 'optuna', got {alg['type']!r}")
    _known(spec.get("search_alg") or {}, SEARCH_ALG_KEYS[alg["type"]], path, "search_alg.",
           f" with search_alg.type {alg['type']}")
    if alg["seed"] is not None and not (isinstance(alg["seed"], int) and not isinstance(alg["seed"], bool)):
        raise UserError(f"{path}: search_alg.seed must be an integer, got {alg['seed']!r}")
    if alg["type"] == "optuna":
        if "n_startup_trials" in alg:
            _check_int(path, "search_alg.n_startup_trials", alg["n_startup_trials"], 1)
        grids = [k for k, d in (spec.get("search") or {}).items() if "grid" in d]
        if grids:
            raise UserError(f"{path}: search.{grids[0]} uses grid, which search_alg optuna cannot sample "
                            f"(TPE draws values): use choice, or search_alg.type random")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise UserError(f"{path}: search_alg optuna needs the optuna package: "
                            f"pip install 'distributed-resnet[tune]'")
    return alg


def _check_scheduler(spec: dict, path: str, alg_type: str, epochs: int) -> None:
    sched = spec.get("scheduler") or {}
    if not isinstance(sched, dict):
        raise UserError(f"{path}: scheduler must be a mapping")
    kind = sched.get("type", "asha")
    if kind not in SCHEDULER_KEYS:
        raise UserError(f"{path}: scheduler.type must be 'asha', 'pbt' or 'none', got {kind!r}")
    _known(sched, SCHEDULER_KEYS[kind], path, "scheduler.", f" with scheduler.type {kind}")
    if kind == "asha":
        _check_int(path, "scheduler.grace_period", sched.get("grace_period", 1), 1)
        factor = sched.get("reduction_factor", 2)
        if not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 1):
            raise UserError(f"{path}: scheduler.reduction_factor must be a number above 1, got {factor!r}")
    if kind != "pbt":
        return
    if alg_type != "random":
        raise UserError(f"{path}: scheduler pbt needs search_alg.type random (Ray's PBT samples the population "
                        f"itself and refuses other search algorithms)")
    if "perturbation_interval" not in sched:
        raise UserError(f"{path}: scheduler pbt needs perturbation_interval (epochs between exploit/explore steps)")
    interval = sched["perturbation_interval"]
    _check_int(path, "scheduler.perturbation_interval", interval, 1)
    if interval >= epochs:
        raise UserError(f"{path}: scheduler.perturbation_interval {interval} must be below the trials' epochs "
                        f"({epochs}), or PBT never acts")
    mutate = sched.get("mutate", ["lr"])
    if not (isinstance(mutate, list) and mutate and all(isinstance(k, str) for k in mutate)):
        raise UserError(f"{path}: scheduler.mutate must be a non-empty list of searched keys, got {mutate!r}")
    search = spec.get("search") or {}
    for key in mutate:
        if key not in MUTABLE:
            raise UserError(f"{path}: scheduler.mutate: PBT cannot change {key} during training; "
                            f"mutable: {', '.join(MUTABLE)}")
        if key not in search:
            raise UserError(f"{path}: scheduler.mutate names {key}, which is not in search (its range bounds the "
                            f"mutations): add search.{key}")
        if "grid" in search[key]:
            raise UserError(f"{path}: search.{key} is a grid; PBT mutates it, so give it choice or a range")
    fraction = sched.get("quantile_fraction", 0.25)
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 0.5):
        raise UserError(f"{path}: scheduler.quantile_fraction must be in (0, 0.5], got {fraction!r}")
    prob = sched.get("resample_probability", 0.25)
    if not (isinstance(prob, (int, float)) and 0 <= prob <= 1):
        raise UserError(f"{path}: scheduler.resample_probability must be in [0, 1], got {prob!r}")
    if not isinstance(sched.get("synch", False), bool):
        raise UserError(f"{path}: scheduler.synch must be true or false, got {sched['synch']!r}")
    check_pbt_population(spec, planned_trials(spec), path)


def check_pbt_population(spec: dict, n: int, where: str) -> None:
    """PBT compares and copies between trials that train at the same time. The Train workers are not part of a
    trial's Tune resources, so only max_concurrent_trials keeps trials from oversubscribing the cluster, and with
    fewer slots than trials the population would run in separate batches that never meet."""
    limit = spec.get("max_concurrent_trials")
    if limit is not None and limit < n:
        raise UserError(f"{where}: scheduler pbt trains its whole population at once: max_concurrent_trials ({limit}) "
                        f"must be >= its {n} trials; lower num_samples or raise the limit")


def _check_int(path: str, key: str, value, low: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise UserError(f"{path}: {key} must be an integer >= {low}, got {value!r}")


def _known(section: dict, allowed: set, path: str, prefix: str, where: str = "") -> None:
    if not isinstance(section, dict):
        raise UserError(f"{path}: {prefix.rstrip('.') or 'the file'} must be a mapping")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(prefix + k for k in unknown)}{where}; "
                        f"allowed: {', '.join(sorted(allowed))}")


def search_alg_spec(spec: dict) -> dict:
    alg = dict(spec.get("search_alg") or {})
    alg.setdefault("type", "random")
    alg.setdefault("seed", 0)
    return alg


def scheduler_spec(spec: dict) -> dict:
    sched = dict(spec.get("scheduler") or {})
    sched.setdefault("type", "asha")
    if sched["type"] == "pbt":
        for key, value in (("mutate", ["lr"]), ("quantile_fraction", 0.25), ("resample_probability", 0.25),
                           ("synch", False)):
            sched.setdefault(key, value)
    return sched


def trial_config(spec: dict, sampled: dict) -> dict:
    """Training settings of one trial: defaults < fixed < resources < sampled values."""
    res = spec.get("resources") or {}
    values = {**(spec.get("fixed") or {}), "num_workers": res.get("num_workers", 1),
              "cpus_per_worker": res.get("cpus_per_worker", 1), "gpus_per_worker": res.get("gpus_per_worker", 0),
              "report_test": False, **sampled}
    values["use_gpu"] = values["gpus_per_worker"] > 0
    return values


def default_point(spec: dict) -> dict:
    """The default recipe in the searched keys: TrainConfig's defaults, overridden by the YAML's `fixed`."""
    base = TrainConfig.from_dict(trial_config(spec, {}))
    return {key: getattr(base, key) for key in (spec.get("search") or {})}


def default_notes(spec: dict) -> list[str]:
    """One note per searched key whose default lies outside its search range (the default trial runs it anyway)."""
    optuna = search_alg_spec(spec)["type"] == "optuna"
    notes = []
    for key, value in default_point(spec).items():
        kind, args = next(iter(spec["search"][key].items()))
        inside = args[0] <= value <= args[1] if kind in ("loguniform", "uniform", "randint") else value in args
        if not inside:
            notes.append(f"search.{key}: the default {value!r} lies outside {kind} {args}; the default trial runs "
                         f"it anyway" + ("; optuna's choices gain it" if optuna and kind == "choice" else ""))
    return notes


def grid_size(spec: dict) -> int:
    return math.prod(len(d["grid"]) for d in (spec.get("search") or {}).values() if "grid" in d)


def planned_trials(spec: dict, num_samples: int | None = None) -> int:
    """Trials the sweep runs: num_samples counts the default trial; a grid runs num_samples times plus the default."""
    n = num_samples or spec.get("num_samples", 1)
    return n if grid_size(spec) == 1 else n * grid_size(spec) + 1


def search_space(spec: dict, point: dict | None = None) -> dict:
    """Tune's param_space; with `point` (optuna), a `choice` list gains the default when it lacks it."""
    from ray import tune

    make = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
            "randint": lambda a: tune.randint(a[0], a[1] + 1),  # inclusive high, as people read [2, 10]
            "choice": tune.choice, "grid": tune.grid_search}
    space = {}
    for key, dist in (spec.get("search") or {}).items():
        kind, args = next(iter(dist.items()))
        if point is not None and kind == "choice" and point[key] not in args:
            args = [*args, point[key]]
        space[key] = make[kind](args)
    return space


def driver_resources(head_cpus: float | None, concurrent: int) -> dict:
    """Each trial's own process (and its Train controller, which follows it) only waits on `fit()`. It asks for
    DRIVER_CPU, on the head node when the head has that to spare for every concurrent trial, so that the worker
    nodes' CPUs all go to Train workers: with 4 trials x 1 CPU on a 4-CPU GPU node, a single trial process there
    would push the 4th worker onto another node."""
    res = {"CPU": DRIVER_CPU}
    if head_cpus is not None and head_cpus >= DRIVER_CPU * concurrent - 1e-9:
        res["node:__internal_head__"] = DRIVER_CPU  # Ray's built-in resource of the head node
    return res


def pbt_scheduler(spec: dict):
    """PBT on `epoch`; metric and mode come from TuneConfig."""
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    from .tune_trials import clip_to_ranges

    sched = scheduler_spec(spec)
    mutations, ranges = {}, {}
    for key in sched["mutate"]:
        kind, args = next(iter(spec["search"][key].items()))
        if kind == "choice":
            mutations[key] = list(args)
        else:
            mutations[key] = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
                              "randint": lambda a: tune.randint(a[0], a[1] + 1)}[kind](args)
            ranges[key] = (args[0], args[1], kind == "randint")
    return PopulationBasedTraining(
        time_attr="epoch", perturbation_interval=sched["perturbation_interval"],
        hyperparam_mutations=mutations, quantile_fraction=sched["quantile_fraction"],
        resample_probability=sched["resample_probability"], synch=sched["synch"],
        custom_explore_fn=functools.partial(clip_to_ranges, ranges))


def run_sweep(spec: dict, data_dir: str | None, storage_path: str, name: str, num_samples: int | None = None,
              resume: bool = False, address: str | None = None, verbose: bool = False) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from .run import data_refs, guard_folder, init_ray, load_data, storage_root
    from .tune_trials import FinalEpochASHA, ProgressLines, run_trial, run_trial_pbt

    root = storage_root(storage_path)
    alg, sched = search_alg_spec(spec), scheduler_spec(spec)
    if sched["type"] == "pbt" and "://" in root:
        raise UserError("scheduler pbt hands checkpoints to the Train workers as folders: use a local "
                        "--storage-path (or a shared file system), not a URI")
    if sched["type"] == "pbt" and num_samples:
        check_pbt_population(spec, planned_trials(spec, num_samples), "--num-samples")
    exp_path = guard_folder(root, name, resume, "sweep")
    fixed = dict(spec.get("fixed") or {})
    if data_dir:
        fixed["data_dir"] = data_dir
    spec = {**spec, "fixed": fixed}
    base = TrainConfig.from_dict(trial_config(spec, {}))
    data = load_data(base)
    init = ckpt.load_weights(base.init_weights, base.depth, base.version, base.padding) if base.init_weights else None
    metric, mode = spec.get("metric", "val_accuracy"), spec.get("mode", "max")
    total = planned_trials(spec, num_samples)
    concurrent = spec.get("max_concurrent_trials") or total
    point = default_point(spec)
    init_ray(address, verbose, extra_cpus=1)  # room for the trial drivers on a local cluster
    if not verbose:
        warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range")  # optuna, on the default
    refs = data_refs(data, ray.put)
    common = dict(spec=spec, data=refs, val_is_test=data.val_is_test, trials_root=f"{exp_path}/trials",
                  init_state=ray.put(init) if init is not None else None)
    if sched["type"] == "pbt":
        trainable = tune.with_parameters(run_trial_pbt, interval=sched["perturbation_interval"], **common)
    else:
        trainable = tune.with_parameters(run_trial, **common)
    head_cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes()
                      if n.get("Alive") and "node:__internal_head__" in n["Resources"]), None)
    trainable = tune.with_resources(trainable, driver_resources(head_cpus, concurrent))
    t0 = time.time()
    if resume:
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        n = (num_samples or spec.get("num_samples", 1)) + (1 if grid_size(spec) > 1 else 0)  # see planned_trials
        limit = spec.get("max_concurrent_trials")
        if alg["type"] == "optuna":
            import optuna
            from ray.tune.search.optuna import OptunaSearch

            if not verbose:
                optuna.logging.set_verbosity(optuna.logging.WARNING)
            sampler = optuna.samplers.TPESampler(seed=alg["seed"], **(
                {"n_startup_trials": alg["n_startup_trials"]} if "n_startup_trials" in alg else {}))
            search_alg, space = OptunaSearch(points_to_evaluate=[point], sampler=sampler), search_space(spec, point)
        else:  # BasicVariantGenerator takes the concurrency limit itself (Tune ignores max_concurrent_trials then)
            search_alg = BasicVariantGenerator(points_to_evaluate=[point], max_concurrent=limit or 0,
                                               random_state=alg["seed"])
            space, limit = search_space(spec), None
        if sched["type"] == "pbt":
            scheduler = pbt_scheduler(spec)
        elif sched["type"] == "none":
            scheduler = FIFOScheduler()
        else:
            scheduler = FinalEpochASHA(base.epochs, time_attr="epoch", max_t=base.epochs,
                                       grace_period=min(base.epochs, sched.get("grace_period", 1)),
                                       reduction_factor=sched.get("reduction_factor", 2))
        progress = ProgressLines(metric, mode, base.epochs, point, total, sched["type"])
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler, search_alg=search_alg,
                                        num_samples=n, max_concurrent_trials=limit),
            run_config=tune.RunConfig(
                name=name, storage_path=root, verbose=1 if verbose else 0, callbacks=[progress],
                failure_config=tune.FailureConfig(max_failures=spec.get("max_failures", 0)),
                # PBT copies checkpoints between trials: keep a few per trial (Ray warns at <= 2).
                checkpoint_config=tune.CheckpointConfig(num_to_keep=4 if sched["type"] == "pbt" else None)),
        )
    grid = tuner.fit()
    return summarize_sweep(grid, spec, metric, mode, base, exp_path, time.time() - t0)


def summarize_sweep(grid, spec, metric, mode, base: TrainConfig, exp_path: str, seconds: float) -> dict:
    """Trials sorted by their best `metric`; the default trial marked; the best trial's best checkpoint, evaluated
    once on test."""
    import ray.train

    from .evaluate import evaluate_checkpoint
    from .storage import as_uri
    from .tune_trials import creation_index, default_trial_id

    searched = list((spec.get("search") or {}).keys())
    sign = 1 if mode == "max" else -1
    pbt = scheduler_spec(spec)["type"] == "pbt"
    point = default_point(spec)
    trials = []
    for result in grid:
        df = _trial_frame(result)
        ids = df["trial_id"].dropna() if df is not None and "trial_id" in df else []
        # Under PBT, result.metrics can be the donor's (an exploit hands over its last result): the rows are not.
        trial_id = str(ids.iloc[0]) if len(ids) else (result.metrics or {}).get("trial_id") or Path(result.path).name
        row = {"trial_id": trial_id,
               "config": {k: result.config.get(k) for k in searched}, "epochs": 0, metric: None,
               "best_epoch": None, "checkpoint": None, "status": "error" if result.error else "done"}
        if df is not None and len(df) and all(f"config/{k}" in df for k in searched):
            # The config the trial last trained with (under PBT, result.config can be the donor's).
            row["config"] = {k: _plain(df[f"config/{k}"].iloc[-1]) for k in searched}
        if result.error:
            row["error"] = str(result.error).strip().splitlines()[-1][:200]
        if df is not None and metric in df and df[metric].notna().any():
            best = best_row(df, metric, sign)
            row.update({"epochs": int(df["epoch"].max()), metric: float(best[metric]), "best_epoch": int(best["epoch"]),
                        "checkpoint": as_uri(_checkpoint_of(df, best, metric, sign), exp_path)})
        if not result.error and row["epochs"] < base.epochs:
            row["status"] = "stopped"  # by ASHA: a diverged trial raises, so it is an error
        row["created"] = creation_index(Path(result.path).name.split(f"{row['trial_id']}_", 1)[-1])
        trials.append(row)
    default_id = default_trial_id([(t["trial_id"], t["created"], t["config"]) for t in trials], point, pbt)
    for t in trials:
        del t["created"]
        t["default"] = t["trial_id"] == default_id
    trials.sort(key=lambda r: -math.inf if r[metric] is None else sign * r[metric], reverse=True)
    best = next((t for t in trials if t["checkpoint"]), None)
    default = next((t for t in trials if t["default"]), None)
    for t in trials:
        t["vs_default"] = (t[metric] - default[metric] if default and default[metric] is not None
                           and t[metric] is not None else None)
    out = {"experiment_path": exp_path, "wall_seconds": seconds, "metric": metric, "trials": trials,
           "default": {"trial_id": default and default["trial_id"], "config": point,
                       metric: default and default[metric],
                       "notes": default_notes(spec)},
           "vs_default": vs_default_text(best, default, metric, sign, pbt)}
    exploits = Path(exp_path, "pbt_global.txt")
    if pbt and exploits.is_file():
        out["pbt_exploits"] = len(exploits.read_text().splitlines())
    if best is not None:
        with ray.train.Checkpoint(best["checkpoint"]).as_directory() as folder:
            test = evaluate_checkpoint(folder, base.data_dir)
        out["best"] = {"trial_id": best["trial_id"], "config": {**trial_config(spec, {}), **best["config"]},
                       "val_accuracy": best[metric] if metric == "val_accuracy" else None, metric: best[metric],
                       "best_epoch": best["best_epoch"], "checkpoint": best["checkpoint"],
                       "test_accuracy": test["test_accuracy"], "is_default": best["default"],
                       "default_trial_id": default and default["trial_id"],
                       f"default_{metric}": default and default[metric],
                       "beats_default_by": (sign * (best[metric] - default[metric]) if default
                                            and default[metric] is not None else None),
                       "vs_default": out["vs_default"]}
    return out


def _plain(value):
    """numpy scalars from a data frame as plain Python values (for JSON and for comparing with the default)."""
    return value.item() if hasattr(value, "item") else value


def _trial_frame(result):
    """A trial's reported rows. Tune prefers result.json, but when a trial restarts (PBT's pauses and exploits) it
    restores that file from storage, which can lag behind and lose rows; progress.csv gets the same rows, so on
    local storage the longer of the two wins."""
    import pandas as pd

    df = result.metrics_dataframe
    csv = Path(result.path, "progress.csv") if "://" not in str(result.path) else None
    if csv is not None and csv.is_file():
        try:
            other = pd.read_csv(csv, dtype={"trial_id": str}, float_precision="round_trip")
        except (ValueError, pd.errors.EmptyDataError):
            other = None
        if other is not None and (df is None or len(other) > len(df)):
            return other
    return df


def _checkpoint_of(df, best, metric: str, sign: int) -> str | None:
    """The best epoch's checkpoint. Every epoch of a whole-run trial has one; a PBT trial reports the paths of the
    checkpoints its segments kept (each segment's best and last), so a missing one falls back to the best kept."""
    path = best.get("checkpoint_path")
    if isinstance(path, str) and path:
        return path
    if "checkpoint_path" not in df:
        return None
    saved = df[df["checkpoint_path"].apply(lambda p: isinstance(p, str) and bool(p))]
    return best_row(saved, metric, sign)["checkpoint_path"] if len(saved) else None


def best_row(df, metric: str, sign: int):
    """The row with the best `metric`, the latest epoch on ties: the checkpoint Ray keeps of tied ones."""
    scored = df[df[metric].notna()]
    return scored.assign(_score=sign * scored[metric]).sort_values(["_score", "epoch"], kind="stable").iloc[-1]


def vs_default_text(best: dict | None, default: dict | None, metric: str, sign: int, pbt: bool) -> str:
    """One sentence: by how much the winner beats the default recipe on `metric`, or that it does not."""
    from .tune_trials import fmt_metric

    if default is None:
        return "no trial of this sweep ran the default recipe"
    if default[metric] is None:
        return f"the default recipe's trial {default['trial_id']} reported no {metric} ({default['status']})"
    caveat = " (under PBT the default trial only started from the default recipe)" if pbt else ""
    if best is None:
        return f"no trial left a checkpoint; the default recipe reached {fmt_metric(metric, default[metric])}"
    if best is default:
        return f"the default recipe is the best trial ({fmt_metric(metric, default[metric])}){caveat}"
    gain = sign * (best[metric] - default[metric])
    amount = f"{100 * gain:+.2f} points of {metric}" if "accuracy" in metric else f"{gain:+.4f} {metric}"
    both = f"({fmt_metric(metric, best[metric])} vs {fmt_metric(metric, default[metric])})"
    if gain > 0:
        return f"the best trial beats the default recipe by {amount} {both}{caveat}"
    return f"the best trial does not beat the default recipe {both}{caveat}"


def print_table(summary: dict) -> None:
    from .tune_trials import fmt_metric

    metric, trials = summary["metric"], summary["trials"]
    keys = sorted({k for t in trials for k in t["config"]})
    head = f"  {'trial':<14}" + "".join(f"{k[:16]:>17}" for k in keys) + f"{'epochs':>7}{metric:>14}  status"
    print(head)
    for t in trials:
        cells = "".join(f"{_fmt(t['config'].get(k)):>17}" for k in keys)
        status = "stopped (ASHA)" if t["status"] == "stopped" else t["status"]
        print(f"{'*' if t.get('default') else ' '} {t['trial_id'][:13]:<14}{cells}{t['epochs']:>7}"
              f"{fmt_metric(metric, t[metric]):>14}  {status}" + (f" ({t['error']})" if t.get("error") else ""))
    print("* the default recipe (TrainConfig defaults + the YAML's fixed)")


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    p = Parser(prog="python -m distributed_resnet.tune", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="sweep YAML (see tune_configs/)")
    p.add_argument("--data-dir", default=None, help="overrides fixed.data_dir (default: the YAML's, else $CIFAR10_DIR)")
    p.add_argument("--storage-path", default="~/ray_results", help="local folder or s3:// URI (default %(default)s)")
    p.add_argument("--name", default=None, help="sweep folder (default: the YAML's name, else tune_<time>)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="trials, the default-recipe trial included (default: the YAML's)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are kept")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: start a local one)")
    p.add_argument("--verbose", action="store_true", help="show Tune's and Ray's own progress output")
    args = p.parse_args(argv)
    spec = load_sweep(args.config)
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples must be a positive integer, got {args.num_samples}")
    data_dir = args.data_dir or (None if (spec.get("fixed") or {}).get("data_dir") else default_data_dir())
    name = args.name or spec.get("name") or f"tune_{time.strftime('%Y%m%d-%H%M%S')}"
    alg, sched = search_alg_spec(spec), scheduler_spec(spec)
    print(f"sweep {name}: {planned_trials(spec, args.num_samples)} trials ({alg['type']} search, {sched['type']} "
          f"scheduler; the first runs the default recipe) from {args.config}", flush=True)
    for note in default_notes(spec):
        print(f"note: {note}", flush=True)
    summary = run_sweep(spec, data_dir, args.storage_path, name, args.num_samples, args.resume, args.address,
                        args.verbose)
    print_table(summary)
    best = summary.get("best")
    path = f"{summary['experiment_path']}/best.json"
    if best is None:
        print("no trial produced a checkpoint", flush=True)
        return 1
    from .storage import write_file

    write_file(summary["experiment_path"], "best.json", json.dumps(best, indent=1).encode())
    write_file(summary["experiment_path"], "trials.json", json.dumps(summary["trials"], indent=1).encode())
    print(f"best trial {best['trial_id']}: val accuracy {100 * best[summary['metric']]:.2f}% at epoch "
          f"{best['best_epoch']}, test accuracy {100 * best['test_accuracy']:.2f}% (evaluated once, after selection)")
    print(f"vs default: {summary['vs_default']}")
    if "pbt_exploits" in summary:
        print(f"PBT: {summary['pbt_exploits']} exploit(s), logged in {summary['experiment_path']}/pbt_global.txt")
    print(f"best config and checkpoint: {path}  ({summary['wall_seconds']:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    main_guard(main)
