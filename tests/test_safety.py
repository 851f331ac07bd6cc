"""Nothing a user loads runs code: a crafted checkpoint is refused at every entry point, with one line."""

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli
from distributed_resnet import checkpoint as ckpt
from distributed_resnet.errors import UserError

PUBLISHED = REPO / "results" / "resnet20v1"


class RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint.pt holds."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def crafted_checkpoint(folder: Path, marker: Path) -> Path:
    """A checkpoint folder that looks complete (meta.json of a ResNet-20 v1, the recorded size) and whose
    checkpoint.pt runs `touch marker` when unpickled with weights_only=False."""
    folder.mkdir(parents=True)
    meta = json.loads((PUBLISHED / "meta.json").read_text())
    torch.save({"format": ckpt.FORMAT, "model": {}, "meta": RunsCode(f"touch {marker}")}, folder / ckpt.STATE_FILE)
    meta["state_bytes"] = (folder / ckpt.STATE_FILE).stat().st_size
    meta["epoch"] = meta["metrics"]["epoch"] = 1
    (folder / ckpt.META_FILE).write_text(json.dumps(meta))
    return folder


def _one_line(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_a_crafted_checkpoint_runs_nothing_anywhere(tmp_path, mini_dir):
    marker = tmp_path / "it_ran"
    evil = crafted_checkpoint(tmp_path / "runs" / "victim" / ckpt.dir_name(1), marker)
    torch.load(evil / ckpt.STATE_FILE, weights_only=False)  # the file is what it claims: it does run code ...
    assert marker.exists()
    marker.unlink()  # ... and from here on nothing may run it
    says = "holds more than tensors and plain values (posix.system), which could run code: not loaded"

    with pytest.raises(UserError, match=r"\(posix\.system\), which could run code"):
        ckpt.load(evil)
    from distributed_resnet import load_pretrained

    with pytest.raises(UserError, match="could run code"):
        load_pretrained(str(evil))
    _one_line(run_cli("evaluate", "--checkpoint", str(evil), "--data-dir", mini_dir), says)
    _one_line(run_cli("train", "--init-weights", str(evil), "--data-dir", mini_dir, "--storage-path",
                      str(tmp_path / "other"), "--name", "x"), says)
    _one_line(run_cli("train", "--resume", "--data-dir", mini_dir, "--storage-path", str(tmp_path / "runs"),
                      "--name", "victim"), says)
    (evil.parent / "results.json").write_text(json.dumps({"best_checkpoint": str(evil)}))
    _one_line(run_cli("export", "--run", str(evil.parent), "--output", str(tmp_path / "out"), "--data-dir", mini_dir),
              says)
    assert not marker.exists()


def test_real_states_load_with_weights_only(tmp_path):
    """What the project writes (weights, Adam, the LR policy, the history) is plain state: weights_only accepts it."""
    state = torch.load(PUBLISHED / ckpt.STATE_FILE, weights_only=True)
    assert state["meta"]["depth"] == 20 and len(state["model"]) > 100
    from distributed_resnet.model import ResNet
    from distributed_resnet.schedule import LRPolicy

    model = ResNet()
    opt = torch.optim.Adam(model.parameters())
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    policy = LRPolicy(1e-3)
    policy.end_epoch(0, 1.0)
    ckpt.save(tmp_path / "full", {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "lr_policy": policy.state_dict(), "epoch": 1,
                                   "history": [{"epoch": 1, "val_accuracy": 0.5}], "restarts": [],
                                   "meta": {"depth": 20, "version": 1}, "rng": {"seed": 0, "next_epoch": 1}})
    loaded = ckpt.load(tmp_path / "full")
    assert loaded["optimizer"]["state"][0]["step"] == 1 and loaded["history"][0]["val_accuracy"] == 0.5


def test_keras_extras_need_a_release_without_the_safe_mode_bypasses():
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    floors = [Requirement(r) for group in extras.values() for r in group if r.startswith("keras")]
    assert floors and all(not r.specifier.contains("3.13.2") and r.specifier.contains("3.14.0") for r in floors)
    assert Version(version("keras")) >= Version("3.14")
