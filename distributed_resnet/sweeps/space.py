"""The search: Tune's search space from the sweep file, the searchers (random, Optuna TPE) and the schedulers (ASHA
with its final-epoch rule, PBT, none).

The default recipe is always a trial: the first point either searcher evaluates is `spec.default_point`, the
default value of every searched key (TrainConfig's default, or the YAML's `fixed` value), through
`points_to_evaluate`. A default outside
its search range is still evaluated (a note says so; with optuna a default missing from a `choice` list joins it).
"""

from __future__ import annotations

import functools

from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from .spec import default_point, grace_epochs, scheduler_spec, search_alg_spec, trial_config

DRIVER_CPU = 0.01  # a trial's own process only waits on fit(): the Train workers hold the real CPUs and GPUs
_RANGES = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
           "randint": lambda a: tune.randint(a[0], a[1] + 1)}  # inclusive high, as people read [2, 10]


def search_space(spec: dict, point: dict | None = None) -> dict:
    """Tune's param_space; with `point` (optuna), a `choice` list gains the default when it lacks it."""
    make = {**_RANGES, "choice": tune.choice, "grid": tune.grid_search}
    space = {}
    for key, dist in (spec.get("search") or {}).items():
        kind, args = next(iter(dist.items()))
        if point is not None and kind == "choice" and point[key] not in args:
            args = [*args, point[key]]
        space[key] = make[kind](args)
    return space


def searcher(spec: dict, point: dict, verbose: bool):
    """(search_alg, param_space, max_concurrent_trials for TuneConfig) for the sweep's search_alg."""
    alg, limit = search_alg_spec(spec), spec.get("max_concurrent_trials")
    if alg["type"] == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        if not verbose:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=alg["seed"], **(
            {"n_startup_trials": alg["n_startup_trials"]} if "n_startup_trials" in alg else {}))
        return OptunaSearch(points_to_evaluate=[point], sampler=sampler), search_space(spec, point), limit
    # BasicVariantGenerator takes the concurrency limit itself (Tune ignores max_concurrent_trials then).
    generator = BasicVariantGenerator(points_to_evaluate=[point], max_concurrent=limit or 0, random_state=alg["seed"])
    return generator, search_space(spec), None


def scheduler(spec: dict, epochs: int, schedule_epochs: int | None = None):
    """The sweep's trial scheduler; metric and mode come from TuneConfig. ASHA's grace period is
    scheduler.grace_period epochs, or scheduler.grace_fraction of the trials' `schedule_epochs`."""
    sched = scheduler_spec(spec)
    if sched["type"] == "pbt":
        return pbt_scheduler(spec)
    if sched["type"] == "none":
        return FIFOScheduler()
    return FinalEpochASHA(epochs, time_attr="epoch", max_t=epochs, grace_period=grace_epochs(sched, schedule_epochs or epochs, epochs),
                          reduction_factor=sched["reduction_factor"])


class FinalEpochASHA(AsyncHyperBandScheduler):
    """ASHA that never stops a trial at its final epoch. The trial is done then anyway, but a Tune STOP kills the
    trial's actor while its Ray Train run is still shutting down: the Train controller dies with it, and the
    workers' placement group is left to Ray's PlacementGroupCleaner (which asks the dashboard, and gives up when
    several Ray instances share the machine; until then the group's CPUs stay taken). Ending by itself, the run
    releases them at once. Trials ASHA stops earlier still depend on that cleaner."""

    def __init__(self, final_epoch: int, **kwargs):
        super().__init__(**kwargs)
        self.final_epoch = final_epoch

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and result.get("epoch", 0) >= self.final_epoch:
            return TrialScheduler.CONTINUE
        return decision


def pbt_scheduler(spec: dict) -> PopulationBasedTraining:
    """PBT on `epoch`, mutating `scheduler.mutate` within their search ranges."""
    sched = scheduler_spec(spec)
    mutations, ranges = {}, {}
    for key in sched["mutate"]:
        kind, args = next(iter(spec["search"][key].items()))
        if kind == "choice":
            mutations[key] = list(args)
        else:
            mutations[key] = _RANGES[kind](args)
            ranges[key] = (args[0], args[1], kind == "randint")
    return PopulationBasedTraining(
        time_attr="epoch", perturbation_interval=sched["perturbation_interval"],
        hyperparam_mutations=mutations, quantile_fraction=sched["quantile_fraction"],
        resample_probability=sched["resample_probability"], synch=sched["synch"],
        custom_explore_fn=functools.partial(clip_to_ranges, ranges))


def clip_to_ranges(ranges: dict, config: dict) -> dict:
    """PBT's explore step multiplies by 0.8 or 1.2 without bounds: keep mutated values in their search range
    (ranges: key -> (low, high, is_int)), so every config stays one that `validate()` accepted for the sweep."""
    out = dict(config)
    for key, (low, high, is_int) in ranges.items():
        if key in out and out[key] is not None:
            value = min(max(out[key], low), high)
            out[key] = int(round(value)) if is_int else float(value)
    return out


def driver_resources(head_cpus: float | None, concurrent: int) -> dict:
    """Each trial's own process (and its Train controller, which follows it) only waits on `fit()`. It asks for
    DRIVER_CPU, on the head node when the head has that to spare for every concurrent trial, so that the worker
    nodes' CPUs all go to Train workers: with 4 trials x 1 CPU on a 4-CPU GPU node, a single trial process there
    would push the 4th worker onto another node."""
    res = {"CPU": DRIVER_CPU}
    if head_cpus is not None and head_cpus >= DRIVER_CPU * concurrent - 1e-9:
        res["node:__internal_head__"] = DRIVER_CPU  # Ray's built-in resource of the head node
    return res
