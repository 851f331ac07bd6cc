"""The checks a run (or a sweep) passes before anything slow: no torch, no Ray, so bad input is refused in well
under a second, with its one-line error, before `train` imports them (seconds) and starts a cluster.

Only what needs neither: the run's name, its folder (writable; there exactly when resuming, on remote storage
too) and the data set's files. `driver.prepare_run` calls the same checks, so `fit()` gets them too; a sweep's
folder and data are checked by `sweeps.cli` here and again by `sweeps.tuner.run_sweep` (for `api.sweep`).
"""

from __future__ import annotations

import os
import time

from . import checkpoint as ckpt
from . import storage
from .config import TrainConfig
from .errors import UserError
from .data import find_source


def check_before_start(cfg: TrainConfig) -> tuple[str, str]:
    """(storage root, run path) of a validated config, after the checks; names the run if it has no name."""
    if not cfg.name:
        cfg.name = default_name(cfg)
    if "/" in cfg.name or cfg.name in (".", ".."):
        raise UserError(f"--name {cfg.name!r} must be a plain folder name")
    root = storage_root(cfg.storage_path)
    run_path = guard_folder(root, cfg.name, cfg.resume, "run")
    if not cfg.download:
        find_source(cfg.data_dir)
    return root, run_path


def default_name(cfg: TrainConfig) -> str:
    return f"resnet{cfg.depth}v{cfg.version}_{time.strftime('%Y%m%d-%H%M%S')}"


def storage_root(storage_path: str) -> str:
    """Ray wants an absolute local path or a URI. Run folders are appended to it, so a URI may not carry a query."""
    if "://" in storage_path and "?" in storage_path:
        raise UserError(f"--storage-path {storage_path}: put the options of the URI in the environment (for S3: "
                        f"AWS_ENDPOINT_URL, AWS_REGION), not in a query string")
    return storage_path if "://" in storage_path else os.path.abspath(os.path.expanduser(storage_path))


def guard_folder(root: str, name: str, resume: bool, what: str) -> str:
    """`root/name`, after checking it can be written and that it exists exactly when resuming (on remote storage
    too: Ray would otherwise silently continue a run of that name)."""
    path = f"{root.rstrip('/')}/{name}"
    ckpt.writable_or_error(root)
    try:
        exists = storage.has_files(path)
    except OSError as e:
        raise UserError(f"cannot read {path} ({str(e).splitlines()[0]}); check the URI and its credentials")
    if exists and not resume:
        raise UserError(f"{what} folder {path} already exists; add --resume to continue it or choose another --name")
    if resume and not exists:
        raise UserError(f"nothing to resume at {path}; drop --resume to start a new {what} there")
    return path
