"""What runs inside a sweep: the trial functions (a whole run, or PBT's segments) and the progress lines.

Kept apart from `tune.py` because Tune pickles these by reference (the callback travels in the experiment
state, the trial functions to the trial actors) and they import Ray at module level; `tune.py` reads and checks
the YAML without importing Ray.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import ray.train
import ray.tune
from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from . import checkpoint as ckpt
from .config import TrainConfig, UserError


class TrialDiverged(RuntimeError):
    """The loss became non-finite: the loop stopped the run (its earlier checkpoints are kept)."""


def run_trial(sampled: dict, spec: dict, data: dict, val_is_test: bool, trials_root: str, init_state=None) -> None:
    """One trial: the project's TorchTrainer, reporting every epoch to Tune through Ray Train's callback."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from .run import build_trainer
    from .tune import trial_config

    values = trial_config(spec, sampled)
    values["name"] = ray.tune.get_context().get_trial_id()  # a restarted trial finds its own Ray Train run again
    cfg = TrainConfig.from_dict({**values, "storage_path": trials_root}).validate()
    # On local storage a restarted worker group also looks in the run folder for a checkpoint Ray had not registered.
    run_dir = f"{trials_root}/{cfg.name}" if "://" not in trials_root else None
    loop_config = {"config": cfg.to_dict(), "data": data, "val_is_test": val_is_test, "run_dir": run_dir,
                   "init_state": init_state}
    result = build_trainer(cfg, trials_root, loop_config, callbacks=[TuneReportCallback()]).fit()
    _raise_if_diverged(result)


def run_trial_pbt(sampled: dict, spec: dict, data: dict, val_is_test: bool, trials_root: str,
                  interval: int, init_state=None) -> None:
    """One PBT trial, `interval` epochs per `fit()`: each segment is its own Ray Train run that starts from the
    previous segment's checkpoint, or from the checkpoint Tune hands over (this trial's own after a pause, a
    better trial's after an exploit). The segment's last epoch reports that checkpoint to Tune, which is what
    PBT copies; the config (a mutated `lr`, plateau settings) applies from the next segment on, since the loop
    takes the LR policy's settings from the config and only its plateau state from the checkpoint."""
    from .run import build_trainer
    from .tune import trial_config

    trial_id = ray.tune.get_context().get_trial_id()
    values = trial_config(spec, sampled)
    total = TrainConfig.from_dict(values).epochs
    given = ray.tune.get_checkpoint()
    resume_from, start = None, 0
    if given is not None:
        resume_from = local_folder(given)
        start = (ckpt.read_meta(resume_from) or {}).get("epoch", 0)
    while start < total:
        end = min((start // interval + 1) * interval, total)  # perturbations fall on multiples of the interval
        # A fresh Ray Train run per segment: reusing a name would restore that run's own latest checkpoint.
        name = f"{trial_id}_e{start:04d}_{uuid.uuid4().hex[:6]}"
        # `epochs` ends the segment; `schedule_epochs` (unchanged) keeps the LR steps where the whole run has them.
        cfg = TrainConfig.from_dict({**values, "epochs": end, "name": name, "storage_path": trials_root}).validate()
        loop_config = {"config": cfg.to_dict(), "data": data, "val_is_test": val_is_test, "resume_from": resume_from,
                       "init_state": init_state}
        result = build_trainer(cfg, trials_root, loop_config).fit()
        _raise_if_diverged(result)
        kept = {Path(c.path).name: c.path for c, _ in (result.best_checkpoints or [])}
        new = [h for h in (result.return_value or {}).get("history", []) if h["epoch"] > start]
        for i, h in enumerate(new):
            metrics = {**h, "segment_start": start, "restored_from": resume_from or ""}
            if ckpt.dir_name(h["epoch"]) in kept:
                metrics["checkpoint_path"] = kept[ckpt.dir_name(h["epoch"])]
            last = i == len(new) - 1 and result.checkpoint is not None
            reported = ray.tune.Checkpoint(result.checkpoint.path, result.checkpoint.filesystem) if last else None
            ray.tune.report(metrics, checkpoint=reported)
        if result.checkpoint is None:
            raise RuntimeError(f"segment {name} ended without a checkpoint")
        resume_from, start = local_folder(result.checkpoint), end


def local_folder(checkpoint) -> str:
    """The checkpoint as a folder the Train workers can open (the loop's `resume_from` is a local path)."""
    import pyarrow.fs

    if checkpoint.filesystem is not None and not isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        raise UserError(f"PBT needs a local --storage-path (or a shared file system); got a checkpoint on "
                        f"{checkpoint.filesystem.type_name}")
    return checkpoint.path


def _raise_if_diverged(result) -> None:
    stopped = (result.return_value or {}).get("stopped")
    if stopped:
        raise TrialDiverged(stopped)


def clip_to_ranges(ranges: dict, config: dict) -> dict:
    """PBT's explore step multiplies by 0.8 or 1.2 without bounds: keep mutated values in their search range
    (ranges: key -> (low, high, is_int)), so every config stays one that `validate()` accepted for the sweep."""
    out = dict(config)
    for key, (low, high, is_int) in ranges.items():
        if key in out and out[key] is not None:
            value = min(max(out[key], low), high)
            out[key] = int(round(value)) if is_int else float(value)
    return out


def creation_index(tag: str) -> int:
    """Where a trial came in the sweep, from its experiment tag (`3_lr=...`, PBT's `3_lr=...@perturbed[...]`):
    Tune numbers the trials it creates. The default point is always the first one a searcher creates."""
    head = str(tag).split("_", 1)[0].split("@", 1)[0]
    return int(head) if head.isdigit() else 1 << 30


def default_trial_id(trials: list[tuple[str, int, dict]], point: dict, pbt: bool) -> str | None:
    """The default recipe's trial among (trial_id, creation index, config): the first created whose searched
    values are the defaults. Under PBT, simply the first created: it started there, and exploits and mutations
    change its config as it trains."""
    found = [(index, trial_id) for trial_id, index, config in trials
             if pbt or all(config.get(k) == v for k, v in point.items())]
    return min(found)[1] if found else None


def fmt_value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def fmt_metric(metric: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.2f}%" if "accuracy" in metric else f"{value:.4f}"


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


class ProgressLines(Callback):
    """One line per trial that ends: finished, stopped by the scheduler (ASHA), or failed; Tune's own tables stay
    off. A trial the scheduler stops gets `done=True` on the very result that stopped it, before callbacks see it;
    a trial that runs all its epochs never reports `done` itself (Tune adds it after the function returns)."""

    def __init__(self, metric: str, mode: str, max_epochs: int, point: dict, total: int, scheduler: str,
                 stream=None):
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.point, self.total, self.scheduler = point, total, scheduler
        self.stopped: set[str] = set()
        self.stream = stream

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("done"):
            self.stopped.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        epochs = self._epochs(trial)
        if trial.trial_id in self.stopped and epochs < self.max_epochs:
            how = f"stopped by {'ASHA' if self.scheduler == 'asha' else 'the scheduler'}"
        else:
            how = "finished"
        self._line(trials, trial, how)

    def on_trial_error(self, iteration, trials, trial, **info):
        error = None
        try:
            err = trial.get_pickled_error() or trial.get_error()
            error = str(err).strip().splitlines()[-1][:200] if err else None
        except Exception:
            pass
        self._line(trials, trial, "error", error)

    def _epochs(self, trial) -> int:
        value = (trial.metric_analysis.get("epoch") or {}).get("max")
        return int(value) if value is not None and not math.isnan(value) else 0

    def _line(self, trials, trial, how: str, error: str | None = None) -> None:
        ended = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
        best = (trial.metric_analysis.get(self.metric) or {}).get(self.mode)
        config = trial.config or {}
        default = default_trial_id([(t.trial_id, creation_index(t.experiment_tag), t.config or {}) for t in trials],
                                   self.point, self.scheduler == "pbt")
        mark = " (default)" if trial.trial_id == default else ""
        settings = " ".join(f"{k}={fmt_value(config.get(k))}" for k in self.point)
        line = (f"[{ended}/{self.total}] trial {trial.trial_id}{mark} {how}: {self._epochs(trial)}/{self.max_epochs} "
                f"epochs, best {self.metric} {fmt_metric(self.metric, best)} | {settings}")
        print(line + (f" | {error}" if error else ""), file=self.stream, flush=True)
