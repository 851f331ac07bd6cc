"""What a checkpoint holds, how it is written and read, and the checks that keep a wrong one out.

A checkpoint is a folder `checkpoint_epoch_NNNN/` with `checkpoint.pt` (model, optimizer, LR-policy state,
epoch, RNG seeds, metric history) and `meta.json` (the same facts a person or `evaluate` needs, readable
without torch). A weights-only checkpoint (the shipped pretrained model, a converted Keras model) has the
same two files with just the model and its meta. Ray Train copies the folder to storage and tracks the best
by `val_accuracy`; in local mode (`--num-workers 0`) Ray keeps nothing, so `LocalKeeper` does the same job in
the run folder. torch is imported on first use: the folder checks before a run starts (`preflight`) need none.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

from .errors import UserError

STATE_FILE = "checkpoint.pt"
META_FILE = "meta.json"
FORMAT = 1


def dir_name(epoch: int, step: int | None = None) -> str:
    """`checkpoint_epoch_NNNN` after epoch NNNN; `checkpoint_epoch_NNNN_step_SSSSS` part-way into the next one (a
    preemption checkpoint). Names sort in training order."""
    return f"checkpoint_epoch_{epoch:04d}" + (f"_step_{step:05d}" if step is not None else "")


def save(folder: str | Path, state: dict) -> None:
    """`state["meta"]` also goes to meta.json, written last with the size of checkpoint.pt: a folder without it, or
    whose checkpoint.pt has another size (a copy cut short), is incomplete."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    import torch

    torch.save({"format": FORMAT, **state}, folder / STATE_FILE)
    size = (folder / STATE_FILE).stat().st_size
    (folder / META_FILE).write_text(json.dumps({"format": FORMAT, **state["meta"], "state_bytes": size}, indent=1))


def load(path: str | Path, map_location="cpu") -> dict:
    """Read `checkpoint.pt` from a checkpoint folder (or the file itself), with a one-line error if it is not one."""
    path = Path(path).expanduser()
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no checkpoint at {path}: expected a checkpoint_epoch_NNNN folder holding {STATE_FILE}")
    import torch

    try:
        # weights_only: tensors, dicts, lists, numbers and strings only; a pickled object (code) is refused.
        state = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(e), re.IGNORECASE)
        if not found:  # not a pickled object: a damaged file
            raise UserError(f"{file} is not a readable checkpoint ({type(e).__name__}); it may be truncated: "
                            f"use another") from None
        what = found.group(1)
        raise UserError(f"{file} holds more than tensors and plain values ({what}), which could run code: "
                        f"not loaded; use a checkpoint this project wrote") from None
    except Exception as e:
        raise UserError(f"{file} is not a readable checkpoint ({type(e).__name__}); it may be truncated: use another") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise UserError(f"{file} is not a distributed_resnet checkpoint (format {FORMAT})")
    return state


def load_weights(path: str | Path, depth: int, version: int, padding: str) -> dict:
    """The model weights of any checkpoint (full or weights-only), checked against the architecture."""
    state = load(path)
    check_compatible(state["meta"], depth, version, str(path), padding)
    return state["model"]


def save_weights(folder: str | Path, model_state: dict, meta: dict) -> None:
    """A weights-only checkpoint (no optimizer): what `evaluate`, `load_pretrained` and `--init-weights` read."""
    save(folder, {"model": {k: v.detach().cpu().contiguous() for k, v in model_state.items()}, "meta": meta})


def read_meta(folder: str | Path) -> dict | None:
    try:
        return parse_meta((Path(folder) / META_FILE).read_bytes())
    except OSError:
        return None


def parse_meta(payload: bytes) -> dict | None:
    try:
        meta = json.loads(payload)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def selection_key(metrics: dict, epoch: int | None = None) -> tuple[float, int]:
    """How checkpoints are ranked everywhere: val accuracy, then the later epoch on ties (as Ray's
    CheckpointConfig keeps the latest of tied checkpoints)."""
    return metrics["val_accuracy"], metrics.get("epoch", epoch or 0)


def padding_of(meta: dict) -> str:
    """Checkpoints from before the padding option were trained with PyTorch's symmetric padding."""
    return meta.get("padding") or meta.get("config", {}).get("padding") or "symmetric"


def check_compatible(meta: dict, depth: int, version: int, where: str, padding: str | None = None) -> None:
    """A checkpoint only restores into the architecture it was saved from (padding included: same weights,
    other padding, is another function)."""
    if (meta.get("depth"), meta.get("version")) != (depth, version):
        raise UserError(
            f"checkpoint {where} is ResNet-{meta.get('depth')} v{meta.get('version')}, but this run is "
            f"ResNet-{depth} v{version}: use --depth {meta.get('depth')} --version {meta.get('version')} or a new --name"
        )
    if padding is not None and padding_of(meta) != padding:
        raise UserError(f"checkpoint {where} was trained with --padding {padding_of(meta)}, but this run uses "
                        f"--padding {padding}: pass --padding {padding_of(meta)}")


def restore_optimizer(optimizer: "torch.optim.Optimizer", saved: dict, fused: bool) -> None:
    """Load the optimizer's state (Adam's moments, SGD's momentum) for *this* run's mode, whatever mode saved it.

    `load_state_dict` would restore the saver's `fused`/`foreach` flags and keep the moments' memory layout,
    so a channels_last (fast-path) checkpoint resumed with NCHW parameters, or the reverse, pairs moments
    with the wrong weights in the vectorised kernels. So: this run's flags first (they also decide where
    `step` lives), then every moment re-laid out like its parameter.
    """
    import torch

    saved = {**saved, "param_groups": [{**g, "fused": fused or None, "foreach": None if fused else g.get("foreach")}
                                       for g in saved["param_groups"]]}
    optimizer.load_state_dict(saved)
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
                if isinstance(state.get(key), torch.Tensor) and state[key].stride() != p.stride():
                    state[key] = torch.empty_like(p).copy_(state[key])


def newest(*checkpoints):
    """The Ray checkpoint with the highest epoch (by its folder name) among those given (None ignored)."""
    found = [c for c in checkpoints if c is not None]
    return max(found, key=lambda c: Path(c.path).name) if found else None


def is_complete(folder: Path) -> bool:
    """meta.json is there and checkpoint.pt has the size it records (checkpoints older than that record: just
    meta.json). Ray copies a checkpoint's files in parallel, so an interrupted copy can leave meta.json whole."""
    meta = read_meta(folder)
    if meta is None:
        return False
    try:
        return meta.get("state_bytes", -1) in (-1, (folder / STATE_FILE).stat().st_size)
    except OSError:
        return False


def complete_in(run_dir: str | Path) -> list[Path]:
    """The complete checkpoint folders in a local run folder, oldest first."""
    return sorted(p for p in Path(run_dir).glob("checkpoint_epoch_*") if is_complete(p))


def latest_in(run_dir: str | Path) -> Path | None:
    found = complete_in(run_dir)
    return found[-1] if found else None


def best_in(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest val accuracy (the latest on ties)."""
    scored = [(p, read_meta(p)) for p in complete_in(run_dir)]
    scored = [(p, m) for p, m in scored if m and (m.get("metrics") or {}).get("val_accuracy") is not None]
    return max(scored, key=lambda pm: selection_key(pm[1]["metrics"], pm[1].get("epoch")))[0] if scored else None


class LocalKeeper:
    """Ray's CheckpointConfig(num_to_keep, score=val_accuracy, max) for local mode: keep the best k and the latest."""

    def __init__(self, run_dir: str | Path, num_to_keep: int):
        self.run_dir, self.num_to_keep = Path(run_dir), num_to_keep

    def kept(self) -> list[tuple[Path, dict]]:
        metas = [(p, read_meta(p)) for p in sorted(self.run_dir.glob("checkpoint_epoch_*"))]
        return [(p, m) for p, m in metas if m and m.get("metrics")]

    def prune(self) -> None:
        kept = self.kept()
        if not kept:
            return
        by_score = sorted(kept, key=lambda pm: selection_key(pm[1]["metrics"], pm[1].get("epoch")), reverse=True)
        keep = {p for p, _ in by_score[: self.num_to_keep]} | {kept[-1][0]}
        for p, _ in kept:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)


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
