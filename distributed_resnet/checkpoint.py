"""What a checkpoint holds, how it is written and read, and the checks that keep a wrong one out.

A checkpoint is a folder `checkpoint_epoch_NNNN/` with `checkpoint.pt` (model, optimizer, LR-policy state,
epoch, RNG seeds, metric history) and `meta.json` (the same facts a person or `evaluate` needs, readable
without torch). Ray Train copies the folder to storage and tracks the best by `val_accuracy`; in local mode
(`--num-workers 0`) Ray keeps nothing, so `LocalKeeper` does the same job in the run folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .config import UserError

STATE_FILE = "checkpoint.pt"
META_FILE = "meta.json"
FORMAT = 1


def dir_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch:04d}"


def save(folder: str | Path, state: dict) -> None:
    """`state["meta"]` also goes to meta.json, written last: a folder without it is incomplete."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, **state}, folder / STATE_FILE)
    (folder / META_FILE).write_text(json.dumps({"format": FORMAT, **state["meta"]}, indent=1))


def load(path: str | Path, map_location="cpu") -> dict:
    """Read `checkpoint.pt` from a checkpoint folder (or the file itself), with a one-line error if it is not one."""
    path = Path(path).expanduser()
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no checkpoint at {path}: expected a checkpoint_epoch_NNNN folder holding {STATE_FILE}")
    try:
        state = torch.load(file, map_location=map_location, weights_only=False)
    except Exception as e:
        raise UserError(f"{file} is not a readable checkpoint ({type(e).__name__}); it may be truncated: use another")
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise UserError(f"{file} is not a distributed_resnet checkpoint (format {FORMAT})")
    return state


def read_meta(folder: str | Path) -> dict | None:
    try:
        return json.loads((Path(folder) / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def check_compatible(meta: dict, depth: int, version: int, where: str) -> None:
    """A checkpoint only restores into the architecture it was saved from."""
    if (meta.get("depth"), meta.get("version")) != (depth, version):
        raise UserError(
            f"checkpoint {where} is ResNet-{meta.get('depth')} v{meta.get('version')}, but this run is "
            f"ResNet-{depth} v{version}: use --depth {meta.get('depth')} --version {meta.get('version')} or a new --name"
        )


def latest_in(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder in a local run folder (one with meta.json, written last)."""
    found = sorted(p for p in Path(run_dir).glob("checkpoint_epoch_*") if (p / META_FILE).is_file())
    return found[-1] if found else None


class LocalKeeper:
    """Ray's CheckpointConfig(num_to_keep, score=val_accuracy, max) for local mode: keep the best k and the latest."""

    def __init__(self, run_dir: str | Path, num_to_keep: int):
        self.run_dir, self.num_to_keep = Path(run_dir), num_to_keep

    def kept(self) -> list[tuple[Path, dict]]:
        return [(p, read_meta(p)) for p in sorted(self.run_dir.glob("checkpoint_epoch_*")) if read_meta(p)]

    def prune(self) -> None:
        kept = self.kept()
        if not kept:
            return
        by_score = sorted(kept, key=lambda pm: pm[1]["metrics"]["val_accuracy"], reverse=True)
        keep = {p for p, _ in by_score[: self.num_to_keep]} | {kept[-1][0]}
        for p, _ in kept:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def best(self) -> Path | None:
        kept = self.kept()
        if not kept:
            return None
        return max(kept, key=lambda pm: (pm[1]["metrics"]["val_accuracy"], -pm[1]["epoch"]))[0]


def writable_or_error(path: str) -> None:
    """Fail before training, not after an hour, if the run folder cannot be written."""
    if "://" in path:
        return  # remote storage (s3://, gs://) is checked by Ray when the run starts
    try:
        os.makedirs(path, exist_ok=True)
        probe = Path(path) / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to storage path {path} ({e.strerror}); pass a writable --storage-path")
