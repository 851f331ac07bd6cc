"""Reading a sweep file: the schema's checks (`schema.py`), then what needs the training config: every corner of
the search space is a config `TrainConfig.validate()` accepts, and the searcher, scheduler and space fit
together. Every mistake is one `UserError` line naming the key. `load_sweep` returns the YAML as a plain dict,
which is what Tune's trial functions receive. No Ray import here.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import ValidationError

from ..config import TrainConfig
from ..errors import UserError
from ..recipes import RECIPES
from .schema import SweepFile, one_line, scheduler_spec, search_alg_spec

RESOURCE_KEYS = ("num_workers", "cpus_per_worker", "gpus_per_worker")
OVERRIDABLE = (*RESOURCE_KEYS, "max_concurrent_trials")  # how a sweep is laid out on a cluster, not what it searches
RANGES = ("loguniform", "uniform", "randint")  # the distributions given as [low, high]
# What PBT may change during a trial: the settings the loop reads from the config at every (re)start, rather
# than from the checkpoint (the optimizer's own hyperparameters, weight decay included, are restored from it).
MUTABLE = ("lr", "lr_policy", "plateau_factor", "plateau_patience", "plateau_cooldown", "plateau_min_lr",
           "plateau_min_delta", "plateau_patience_fraction", "plateau_cooldown_fraction")
# Settings counted in epochs and their forms as a fraction of schedule_epochs: a sweep gives one or the other.
FRACTIONAL = {"plateau_patience": "plateau_patience_fraction", "plateau_cooldown": "plateau_cooldown_fraction"}
# Keys a full-length `train` command leaves out: where a run lives, and what the trials' layout decided.
# The answer is for the whole training set, so a search on a subset (max_train_samples) does not carry over.
NOT_IN_COMMAND = ("storage_path", "name", "resume", "report_test", "data_dir", "download", "use_gpu", "min_workers",
                  "init_weights", "epochs", "schedule_epochs", "max_train_samples", "max_test_samples")


def flag(key: str) -> str:
    """The `tune` flag of an overridable key: max_concurrent_trials -> --max-concurrent-trials."""
    return "--" + key.replace("_", "-")


def load_sweep(path: str, overrides: dict | None = None) -> dict:
    """Read and check a sweep YAML; every mistake is a one-line UserError naming the key. `overrides` (the `tune`
    flags --num-workers, --cpus-per-worker, --gpus-per-worker, --max-concurrent-trials) replace the file's
    `resources` and `max_concurrent_trials`, so one file runs on a 2-core CPU and on a GPU: the search, the searcher
    and the fixed settings stay the file's."""
    import yaml

    try:
        spec = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"no sweep config at {path}; see tune_configs/ for examples")
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}")
    spec = {k: v for k, v in spec.items() if v is not None} if isinstance(spec, dict) else spec
    where = path
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if given and isinstance(spec, dict):
        if set(given) - set(OVERRIDABLE):
            raise ValueError(f"only {OVERRIDABLE} can be overridden, got {sorted(given)}")  # a caller's bug
        flags = ", ".join(f"{flag(k)} {v}" for k, v in given.items())
        where = f"{path} with {flags}"
        spec = dict(spec)
        resources = {k: v for k, v in given.items() if k in RESOURCE_KEYS}
        if resources:
            spec["resources"] = {**(spec.get("resources") or {}), **resources}
        if "max_concurrent_trials" in given:
            spec["max_concurrent_trials"] = given["max_concurrent_trials"]
    try:
        SweepFile.model_validate(spec)
    except ValidationError as e:
        raise UserError(f"{where}: {one_line(e, spec)}") from None
    check_against_training(spec, where)
    return spec


def fast_dev_run(spec: dict, where: str) -> dict:
    """The sweep at a size that checks its whole path in a few minutes (`tune --fast-dev-run`): at most 2 trials of
    1 epoch on 128 training images and 256 test images (PBT: one epoch past its first perturbation), a grid cut to its first value, and
    a confirmation of the best and the default, 1 seed of 1 epoch."""
    sched = scheduler_spec(spec)
    epochs = sched["perturbation_interval"] + 1 if sched["type"] == "pbt" else 1
    fixed = {**(spec.get("fixed") or {}), "epochs": epochs, "max_train_samples": 128, "val_size": 64,
             "max_test_samples": 256}
    fixed.pop("schedule_epochs", None)
    search = {k: ({"grid": d["grid"][:1]} if "grid" in d else d) for k, d in (spec.get("search") or {}).items()}
    small = {**spec, "fixed": fixed, "search": search, "num_samples": min(FAST_DEV_TRIALS, spec.get("num_samples", 1))}
    small.pop("target_epochs", None)
    if small.get("confirm"):
        small["confirm"] = {"top_k": 1, "seeds": 1, "epochs": 1}
    check_against_training(small, f"{where} with --fast-dev-run")
    return small


FAST_DEV_TRIALS = 2  # the most trials `tune --fast-dev-run` runs, --num-samples included


def trial_config(spec: dict, sampled: dict) -> dict:
    """Training settings of one trial: defaults < fixed < resources < sampled values."""
    res = spec.get("resources") or {}
    values = {**(spec.get("fixed") or {}), "num_workers": res.get("num_workers", 1),
              "cpus_per_worker": res.get("cpus_per_worker", 1), "gpus_per_worker": res.get("gpus_per_worker", 0),
              "report_test": False, **sampled}
    values["use_gpu"] = values["gpus_per_worker"] > 0
    return values


def grid_size(spec: dict) -> int:
    return math.prod(len(d["grid"]) for d in (spec.get("search") or {}).values() if "grid" in d)


def planned_trials(spec: dict, num_samples: int | None = None) -> int:
    """Trials the sweep runs: num_samples counts the default trial; a grid runs num_samples times plus the default."""
    n = num_samples or spec.get("num_samples", 1)
    return n if grid_size(spec) == 1 else n * grid_size(spec) + 1


def check_pbt_population(spec: dict, n: int, where: str) -> None:
    """PBT compares and copies between trials that train at the same time. The Train workers are not part of a
    trial's Tune resources, so only max_concurrent_trials keeps trials from oversubscribing the cluster, and with
    fewer slots than trials the population would run in separate batches that never meet."""
    limit = spec.get("max_concurrent_trials")
    if limit is not None and limit < n:
        raise UserError(f"{where}: scheduler pbt trains its whole population at once: max_concurrent_trials ({limit}) "
                        f"must be >= its {n} trials; lower num_samples or raise the limit")


def check_against_training(spec: dict, path: str) -> None:
    """What the schema cannot see: the keys and values the trainer accepts, and how the parts fit together."""
    fields = set(TrainConfig.__dataclass_fields__) - set(RESOURCE_KEYS)
    for section in ("fixed", "search"):
        unknown = sorted(set(spec.get(section) or {}) - fields)
        if unknown:
            raise UserError(f"{path}: unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
                            f"allowed: {', '.join(sorted(fields))}")
    search = spec.get("search") or {}
    # The driver loads fixed.init_weights once, for the base architecture, and hands it to every trial.
    clash = sorted({"init_weights", "depth", "version", "padding"} & set(search))
    if clash and ("init_weights" in clash or (spec.get("fixed") or {}).get("init_weights")):
        raise UserError(f"{path}: search.{clash[0]} cannot vary with init_weights (one set of weights, of one "
                        f"architecture, starts every trial): fix it, or drop init_weights")
    # The default trial and every corner of the space make valid training configs.
    base = trial_config(spec, {})
    TrainConfig.from_dict(base).validate()
    for key, dist in search.items():
        for value in next(iter(dist.values())):  # the choices, or both ends of a range
            TrainConfig.from_dict({**base, key: value}).validate()
    if search_alg_spec(spec)["type"] == "optuna":
        grids = [k for k, d in search.items() if "grid" in d]
        if grids:
            raise UserError(f"{path}: search.{grids[0]} uses grid, which search_alg optuna cannot sample "
                            f"(TPE draws values): use choice, or search_alg.type random")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise UserError(f"{path}: search_alg optuna needs the optuna package: "
                            f"pip install 'distributed-resnet[tune]'")
    given = set(spec.get("fixed") or {}) | set(search)
    for epochs_key, fraction_key in FRACTIONAL.items():
        if {epochs_key, fraction_key} <= given:
            raise UserError(f"{path}: {epochs_key} (epochs) and {fraction_key} (of schedule_epochs) set the same "
                            f"thing: give one of them, preferably {fraction_key}")
    sched = scheduler_spec(spec)
    if sched["type"] == "asha" and sched["grace_period"] is not None and sched["grace_fraction"] is not None:
        raise UserError(f"{path}: scheduler.grace_period (epochs) and scheduler.grace_fraction (of schedule_epochs) "
                        f"set the same thing: give one of them")
    trials = TrainConfig.from_dict(base)
    full = full_length(spec)
    if full < trials.epochs:
        raise UserError(f"{path}: target_epochs {full} is below the trials' {trials.epochs} epochs: the full length "
                        f"is at least what the search runs")
    _check_confirm(spec, sched, path, full)
    if sched["type"] == "pbt":
        _check_pbt(spec, sched, path, trials.epochs)


def full_length(spec: dict) -> int:
    """The epochs the sweep's answer is for: `target_epochs`, else the recipe's (200 for keras, 30 for fast), or
    the trials' own epochs where they run longer."""
    trials = TrainConfig.from_dict(trial_config(spec, {}))
    return spec.get("target_epochs") or max(RECIPES[trials.recipe]["epochs"], trials.epochs)


def confirm_epochs(spec: dict) -> int:
    return (spec.get("confirm") or {}).get("epochs") or full_length(spec)


def _check_confirm(spec: dict, sched: dict, path: str, full: int) -> None:
    confirm = spec.get("confirm")
    if not confirm:
        return
    if sched["type"] == "pbt":
        raise UserError(f"{path}: confirm re-runs configurations from scratch, and a PBT trial's configuration "
                        f"changes as it trains: use scheduler asha or none with confirm")
    others = planned_trials(spec) - 1
    k = confirm.get("top_k", 2)
    if k > others:
        raise UserError(f"{path}: confirm.top_k {k} is more than the {others} searched trials (the default recipe "
                        f"is confirmed anyway): lower top_k or raise num_samples")
    epochs = confirm_epochs(spec)
    if epochs > full:
        raise UserError(f"{path}: confirm.epochs {epochs} is above the full length, {full} epochs (target_epochs, "
                        f"else the recipe's): lower it or raise target_epochs")


def grace_epochs(sched: dict, schedule_epochs: int, epochs: int) -> int:
    """ASHA's grace period in epochs: grace_period, or grace_fraction of the trials' schedule_epochs."""
    if sched.get("grace_fraction") is not None:
        return min(epochs, max(1, round(sched["grace_fraction"] * schedule_epochs)))
    return min(epochs, sched.get("grace_period") or 1)


def reference_schedule(recipe: str) -> int:
    """The schedule a recipe's own epoch-counted defaults are meant for (the reference's 200 for keras)."""
    return RECIPES[recipe].get("schedule_epochs", RECIPES[recipe]["epochs"])


def at_length(spec: dict, values: dict, epochs: int, default: bool = False) -> dict:
    """A trial's settings run at `epochs` with the whole schedule (epochs = schedule_epochs = `epochs`).
    Fractional settings carry over as they are; an epoch-counted patience or cooldown the sweep gave (in `fixed` or
    `search`) is turned into its fraction of the schedule it was counted on, so it keeps its place in the run: the
    trials' schedule for a sampled or `fixed` value, the recipe's own (`reference_schedule`) for the `default`
    candidate's value that came from TrainConfig's defaults (the reference's patience 5 is 5 of 200 epochs)."""
    trials = TrainConfig.from_dict(trial_config(spec, values))
    fixed = set(spec.get("fixed") or {})
    given = fixed | set(spec.get("search") or {})
    out = {**values, "epochs": epochs, "schedule_epochs": epochs}
    for epochs_key, fraction_key in FRACTIONAL.items():
        counted_on = (reference_schedule(trials.recipe) if default and epochs_key not in fixed
                      else trials.schedule_epochs)
        if epochs_key in given and epochs != counted_on:
            counted = getattr(trials, epochs_key)
            out[epochs_key] = TrainConfig.__dataclass_fields__[epochs_key].default  # over fixed's epoch count
            out[fraction_key] = counted / counted_on
    return out


def train_command(spec: dict, values: dict) -> str:
    """The `train` command of a trial's settings (`at_length` for the full length): every setting that differs
    from its recipe's default, plus the sweep's resources; add --data-dir and --storage-path to taste."""
    cfg = TrainConfig.from_dict(trial_config(spec, values))
    defaults = TrainConfig(recipe=cfg.recipe, epochs=cfg.epochs, schedule_epochs=cfg.schedule_epochs)
    parts = ["python -m distributed_resnet.train", f"--recipe {cfg.recipe}", f"--epochs {cfg.epochs}",
             f"--schedule-epochs {cfg.schedule_epochs}"]
    for key, value in cfg.to_dict().items():
        if key in NOT_IN_COMMAND or (value == getattr(defaults, key) and key not in RESOURCE_KEYS[:2]):
            continue
        if key == "gpus_per_worker" and not cfg.use_gpu:
            continue
        if isinstance(value, bool):
            if key in ("augment", "nesterov"):  # on by default: the flag turns them off
                parts.append(f"--no-{key}")
            elif value:
                parts.append(flag(key))
        elif value is not None:
            parts.append(f"{flag(key)} {value!r}" if isinstance(value, float) else f"{flag(key)} {value}")
    return " ".join(p for p in parts if p)


def _check_pbt(spec: dict, sched: dict, path: str, epochs: int) -> None:
    if search_alg_spec(spec)["type"] != "random":
        raise UserError(f"{path}: scheduler pbt needs search_alg.type random (Ray's PBT samples the population "
                        f"itself and refuses other search algorithms)")
    if sched["perturbation_interval"] >= epochs:
        raise UserError(f"{path}: scheduler.perturbation_interval {sched['perturbation_interval']} must be below the "
                        f"trials' epochs ({epochs}), or PBT never acts")
    search = spec.get("search") or {}
    for key in sched["mutate"]:
        if key not in MUTABLE:
            raise UserError(f"{path}: scheduler.mutate: PBT cannot change {key} during training; "
                            f"mutable: {', '.join(MUTABLE)}")
        if key not in search:
            raise UserError(f"{path}: scheduler.mutate names {key}, which is not in search (its range bounds the "
                            f"mutations): add search.{key}")
        if "grid" in search[key]:
            raise UserError(f"{path}: search.{key} is a grid; PBT mutates it, so give it choice or a range")
    check_pbt_population(spec, planned_trials(spec), path)


def default_point(spec: dict) -> dict:
    """The default recipe in the searched keys: TrainConfig's defaults, overridden by the YAML's `fixed`."""
    base = TrainConfig.from_dict(trial_config(spec, {}))
    point = {key: getattr(base, key) for key in (spec.get("search") or {})}
    for epochs_key, fraction_key in FRACTIONAL.items():  # the default's epochs as a fraction of the reference's 200
        if fraction_key in point and point[fraction_key] is None:
            point[fraction_key] = getattr(base, epochs_key) / reference_schedule(base.recipe)
    return point


def default_notes(spec: dict) -> list[str]:
    """One note per searched key whose default lies outside its search range (the default trial runs it anyway)."""
    optuna = search_alg_spec(spec)["type"] == "optuna"
    notes = []
    for key, value in default_point(spec).items():
        kind, args = next(iter(spec["search"][key].items()))
        inside = args[0] <= value <= args[1] if kind in RANGES else value in args
        if not inside:
            notes.append(f"search.{key}: the default {value!r} lies outside {kind} {args}; the default trial runs "
                         f"it anyway" + ("; optuna's choices gain it" if optuna and kind == "choice" else ""))
    return notes


def refuse_new_layout_on_resume(overrides: dict | None, resume: bool) -> None:
    """Tune restores a sweep with the concurrency it was saved with: a resumed sweep keeps its layout."""
    given = sorted(k for k, v in (overrides or {}).items() if v is not None)
    if resume and given:
        flags = ", ".join(flag(k) for k in given)
        raise UserError(f"--resume continues a sweep as it was laid out: drop {flags}")


def check_layout(spec: dict, storage_root: str, num_samples: int | None) -> None:
    """What the storage and the trial count must allow, checked before the sweep folder (by `tune`, at once)."""
    if scheduler_spec(spec)["type"] != "pbt":
        return
    if "://" in storage_root:
        raise UserError("scheduler pbt hands checkpoints to the Train workers as folders: use a local "
                        "--storage-path (or a shared file system), not a URI")
    if num_samples:
        check_pbt_population(spec, planned_trials(spec, num_samples), "--num-samples")
