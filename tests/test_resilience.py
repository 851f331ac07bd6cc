"""Faults injected into real runs: Ctrl-C, a killed driver, a killed worker, a NaN loss. (A node that goes
away: test_elastic.py.)"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from conftest import REPO, kill_with_everything_it_started, run_cli
from distributed_resnet import checkpoint as ckpt

SMALL = ["--max-train-samples", "256", "--val-size", "100"]  # 2 steps an epoch
EPOCHS = 8


def start_train(tmp_path, mini_dir, name, epochs, *extra):
    cmd = [sys.executable, "-m", "distributed_resnet.train", "--num-workers", "2", "--epochs", str(epochs),
           "--data-dir", mini_dir, "--storage-path", str(tmp_path), "--name", name, *SMALL, *extra]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def read_until_epoch(proc, epoch: int, settle: float = 1.0) -> str:
    """Read the run's output until it has printed `epoch`, then wait `settle` seconds (Ray registers checkpoints)."""
    seen = ""
    for line in proc.stdout:
        seen += line
        if re.match(rf"epoch +{epoch}/", line):
            time.sleep(settle)
            return seen
    raise AssertionError(f"run ended before epoch {epoch}:\n{seen}")


def train_workers(driver) -> list:
    """The Ray Train workers of this driver's own local cluster (never those of another run on the machine)."""
    found = []
    for p in psutil.Process(driver.pid).children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if cmd and cmd[0].startswith("ray::RayTrainWorker"):
            found.append(p)
    return found


def printed_epochs(stdout: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^epoch +(\d+)/", stdout, re.M)]


def test_ctrl_c_a_killed_driver_and_a_killed_worker_each_resume_from_the_newest_checkpoint(tmp_path, mini_dir):
    """Ctrl-C says where it stopped and how to go on; that command resumes; its driver, killed with everything it
    started (its machine gone), is refused without --resume and continued with it; in that last run a training
    worker is killed, and Ray Train restarts the group from the newest checkpoint. No epoch lost or rerun."""
    proc = start_train(tmp_path, mini_dir, "c", EPOCHS)
    before = read_until_epoch(proc, 2)
    os.kill(proc.pid, signal.SIGINT)  # Ctrl-C, as a user would
    out = before + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    said = [l for l in out.splitlines() if l.startswith("interrupted")]
    printed = printed_epochs(out)[-1]
    # The message names the newest saved checkpoint: the last printed epoch, or the next one when Ctrl-C came
    # between that epoch's checkpoint and its line.
    assert len(said) == 1 and 2 <= printed < EPOCHS, out
    first = int(said[0].split("after epoch ")[1].split(";")[0])
    assert first in (printed, printed + 1), out
    command = said[0].split("continue with: ")[1]
    assert command.endswith("--resume") and "--name c" in command and "Traceback" not in out

    resumed = subprocess.Popen([sys.executable, *shlex.split(command)[1:]], cwd=REPO, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    seen = read_until_epoch(resumed, first + 1, settle=0)
    assert printed_epochs(seen) == [first + 1], seen  # continued after the saved epoch, none re-run
    kill_with_everything_it_started(resumed)
    second = ckpt.read_meta(ckpt.latest_in(tmp_path / "c"))["epoch"]  # written, maybe not registered by Ray
    assert first < second < EPOCHS - 1  # room for the killed worker's run

    again = ["--num-workers", "2", "--epochs", str(EPOCHS), "--data-dir", mini_dir, "--storage-path", str(tmp_path),
             "--name", "c", *SMALL]
    refused = run_cli("train", *again)
    assert refused.returncode == 2 and "already exists" in refused.stderr
    finished = start_train(tmp_path, mini_dir, "c", EPOCHS, "--resume")
    before = read_until_epoch(finished, second + 1, settle=0)
    workers = train_workers(finished)
    assert len(workers) == 2
    workers[-1].kill()  # SIGKILL one training worker mid-run
    after, _ = finished.communicate(timeout=300)
    assert finished.returncode == 0, before + after
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert results["restarts"][:2] == [first, second] and len(results["restarts"]) == 3, results["restarts"]
    third = results["restarts"][2]
    epochs = printed_epochs(before + after)
    # Restored from the newest checkpoint on disk, even one Ray had not registered yet: no epoch runs twice, only
    # the one in progress is lost, and the one missing line can be that of the epoch restored from (its
    # checkpoint written, its line not yet printed, when the worker died).
    assert third > second and epochs[0] == second + 1 and epochs == sorted(set(epochs)), epochs
    assert set(range(second + 1, EPOCHS + 1)) - set(epochs) <= {third}, epochs
    assert [h["epoch"] for h in results["history"]] == list(range(1, EPOCHS + 1))
    line = next(l for l in before.splitlines() if l.startswith("epoch "))
    assert all(k in line for k in ("lr", "loss", "val", "test", "img/s", "ETA")), line
    assert "best checkpoint:" in after and "curves:" in after
    # The restored runs went on with the same optimizer state: Adam's step count covers every epoch.
    import torch

    state = torch.load(tmp_path / "c" / f"checkpoint_epoch_{EPOCHS:04d}" / "checkpoint.pt", weights_only=False)
    assert max(s["step"].item() for s in state["optimizer"]["state"].values()) == EPOCHS * 2  # 2 steps/epoch
    assert state["restarts"] == results["restarts"]


def test_nan_loss_stops_cleanly_and_keeps_best_checkpoint(tmp_path, mini_dir):
    args = ["--num-workers", "0", "--data-dir", mini_dir, "--storage-path", str(tmp_path), "--name", "n", *SMALL]
    assert run_cli("train", "--epochs", "1", *args).returncode == 0
    # Poison Adam's first moment in the checkpoint (a resume may not change the LR, so an absurd --lr is refused):
    # the first step of epoch 2 then writes NaN into the weights.
    folder = tmp_path / "n" / "checkpoint_epoch_0001"
    state = ckpt.load(folder)
    state["optimizer"]["state"][0]["exp_avg"].fill_(float("nan"))
    ckpt.save(folder, {k: v for k, v in state.items() if k != "format"})
    proc = run_cli("train", "--epochs", "3", "--resume", *args)
    assert proc.returncode == 1
    assert "the loss became nan at epoch 2" in proc.stdout and "try a lower --lr" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    results = json.loads((tmp_path / "n" / "results.json").read_text())
    assert results["best_checkpoint"].endswith("checkpoint_epoch_0001") and Path(results["best_checkpoint"]).is_dir()
    assert "nan" in results["stopped"]
    assert not (tmp_path / "n" / "checkpoint_epoch_0002").exists()
