"""The trial functions Tune runs: a whole training run per trial, or PBT's segments.

Tune pickles these by reference and runs them in trial actors; each builds the project's `TorchTrainer` and
calls `fit()`, with Ray Train's `TuneReportCallback` for a whole run (the Ray Train V2 pattern:
`Tuner(TorchTrainer)` is gone).

PBT: `TuneReportCallback` forwards only a checkpoint *path*, so PBT would find no Tune checkpoint to copy.
Instead a PBT trial trains segment by segment: each segment is a fresh Ray Train run of `perturbation_interval`
epochs (`epochs` set to the segment's end, `schedule_epochs` fixed to the whole run's, so the LR policy stays
put) that starts from `ray.tune.get_checkpoint()` handed to the loop as `resume_from`, and its last epoch
reports the segment's checkpoint with `ray.tune.report`. An exploit thus restores the better trial's weights,
optimizer and plateau state, while the LR policy's settings come from the mutated config. Costs: a worker-group
start per segment, and a local storage path (the Train workers read the Tune checkpoint as a folder).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import ray.train
import ray.tune

from .. import checkpoint as ckpt
from ..config import TrainConfig
from ..errors import UserError
from ..driver import build_trainer
from .spec import trial_config


class TrialDiverged(RuntimeError):
    """The loss became non-finite: the loop stopped the run (its earlier checkpoints are kept)."""


def run_trial(sampled: dict, spec: dict, data: dict, val_is_test: bool, trials_root: str, init_state=None) -> None:
    """One trial: the project's TorchTrainer, reporting every epoch to Tune through Ray Train's callback."""
    from ray.tune.integration.ray_train import TuneReportCallback

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
    trial_id = ray.tune.get_context().get_trial_id()
    values = trial_config(spec, sampled)
    whole = TrainConfig.from_dict(values)
    total, values["schedule_epochs"] = whole.epochs, whole.schedule_epochs
    given = ray.tune.get_checkpoint()
    resume_from, start = None, 0
    if given is not None:
        resume_from = local_folder(given)
        start = (ckpt.read_meta(resume_from) or {}).get("epoch", 0)
    while start < total:
        end = min((start // interval + 1) * interval, total)  # perturbations fall on multiples of the interval
        # A fresh Ray Train run per segment: reusing a name would restore that run's own latest checkpoint.
        name = f"{trial_id}_e{start:04d}_{uuid.uuid4().hex[:6]}"
        # `epochs` ends the segment; `schedule_epochs` (the whole run's) keeps the LR policy where the run has it.
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
