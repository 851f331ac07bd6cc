"""Running a sweep: Ray Tune's `Tuner` over the trial functions, returning Tune's own `ResultGrid`.

The driver loads the data (and any `fixed.init_weights`) once and puts them in the object store; every trial
reports each epoch; the scheduler stops weak trials on the metric (validation accuracy by default); afterwards
`summary.summarize_sweep` evaluates the winner's best checkpoint once on test. ASHA never stops a trial at its
last epoch (see `space.FinalEpochASHA`). PBT trains its whole population at once, segment by segment (see
`trials`), and needs a local storage path.
"""

from __future__ import annotations

import time
import warnings

import ray
from ray import tune

from .. import checkpoint as ckpt
from ..config import TrainConfig
from ..preflight import guard_folder, storage_root
from ..driver import data_refs, init_ray, load_data
from .confirm import candidates_once, run_confirmation, summarize_confirmation
from .progress import ProgressLines
from .space import driver_resources, scheduler, searcher
from .spec import check_layout, default_point, grid_size, planned_trials, scheduler_spec, trial_config
from .summary import summarize_sweep
from .trials import run_trial, run_trial_pbt


def run_sweep(spec: dict, data_dir: str | None, storage_path: str, name: str, num_samples: int | None = None,
              resume: bool = False, address: str | None = None, verbose: bool = False):
    """(Tune's ResultGrid, the project's summary) of the sweep `spec` (from `spec.load_sweep`). With `confirm:`,
    the confirmation runs after the search, and its own ResultGrid is `grid.confirmation` (else None)."""
    root = storage_root(storage_path)
    sched = scheduler_spec(spec)
    check_layout(spec, root, num_samples)
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
    point = default_point(spec)
    init_ray(address, verbose, extra_cpus=1)  # room for the trial drivers on a local cluster
    if not verbose:
        warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range")  # optuna, on the default
    common = dict(spec=spec, data=data_refs(data, ray.put), val_is_test=data.val_is_test,
                  trials_root=f"{exp_path}/trials", init_state=ray.put(init) if init is not None else None)
    if sched["type"] == "pbt":
        trainable = tune.with_parameters(run_trial_pbt, interval=sched["perturbation_interval"], **common)
    else:
        trainable = tune.with_parameters(run_trial, **common)
    head_cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes()
                      if n.get("Alive") and "node:__internal_head__" in n["Resources"]), None)
    resources = driver_resources(head_cpus, spec.get("max_concurrent_trials") or total)
    trainable = tune.with_resources(trainable, resources)
    t0 = time.time()
    if resume:
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        n = (num_samples or spec.get("num_samples", 1)) + (1 if grid_size(spec) > 1 else 0)  # see planned_trials
        search_alg, space, limit = searcher(spec, point, verbose)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=search_alg, num_samples=n,
                                        scheduler=scheduler(spec, base.epochs, base.schedule_epochs),
                                        max_concurrent_trials=limit),
            run_config=tune.RunConfig(
                name=name, storage_path=root, verbose=1 if verbose else 0,
                callbacks=[ProgressLines(metric, mode, base.epochs, point, total, sched["type"])],
                failure_config=tune.FailureConfig(max_failures=spec.get("max_failures", 0)),
                # PBT copies checkpoints between trials: keep a few per trial (Ray warns at <= 2).
                checkpoint_config=tune.CheckpointConfig(num_to_keep=4 if sched["type"] == "pbt" else None)),
        )
    grid = tuner.fit()
    summary = summarize_sweep(grid, spec, metric, mode, base, exp_path, time.time() - t0)
    grid.confirmation = None  # the confirmation's own ResultGrid, when the sweep has one
    ended = grid.num_terminated + grid.num_errors
    if spec.get("confirm") and ended < len(grid):
        # Interrupted (Ctrl-C leaves trials running or pending): a partial ranking would pick the candidates.
        print(f"confirmation not started: the search ended {ended} of its {len(grid)} trials; "
              f"run the same command with --resume to finish the search, then confirm", flush=True)
        summary["search_unfinished"] = True
    elif spec.get("confirm") and summary.get("best") is not None:
        t1 = time.time()
        cands = candidates_once(summary, spec, exp_path)
        stage = {**common, "trials_root": f"{exp_path}/confirm_trials"}
        del stage["spec"]
        grid.confirmation = run_confirmation(spec, cands, exp_path, metric, mode, resume, resources, verbose, **stage)
        confirmation = summarize_confirmation(grid.confirmation, cands, spec, metric, mode, base.data_dir,
                                              exp_path, stage["trials_root"])
        confirmation["wall_seconds"] = time.time() - t1
        summary["confirmation"] = summary["best"]["confirmation"] = confirmation
        if confirmation["recommended"]:
            summary["best"]["recommended"] = confirmation["recommended"]
    return grid, summary
