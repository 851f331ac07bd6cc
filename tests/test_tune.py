"""The Tune sweep: YAML checks, a real 2-trial sweep end to end, and --resume after the driver is killed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli
from distributed_resnet.config import UserError
from distributed_resnet.tune import load_sweep, trial_config

SMOKE = REPO / "tune_configs" / "smoke.yaml"


def write_sweep(tmp_path, mini_dir, **overrides) -> Path:
    spec = yaml.safe_load(SMOKE.read_text())
    spec["fixed"].update(data_dir=mini_dir, val_size=100, max_train_samples=128)
    spec.update(overrides)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_shipped_configs_pass_the_schema():
    for name in ("smoke.yaml", "lr_plateau.yaml"):
        spec = load_sweep(str(REPO / "tune_configs" / name))
        assert spec["metric"] == "val_accuracy" and "lr" in spec["search"]
    spec = load_sweep(str(REPO / "tune_configs" / "lr_plateau.yaml"))
    assert set(spec["search"]) >= {"lr", "lr_policy", "plateau_factor", "plateau_patience", "plateau_cooldown",
                                   "plateau_min_lr"}
    assert spec["resources"]["gpus_per_worker"] < 1  # trials share a GPU
    assert trial_config(spec, {})["use_gpu"] is True


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s.update(epochz=3), "unknown key\\(s\\) epochz"),
    (lambda s: s["fixed"].update(learning_rate=0.1), "unknown key\\(s\\) fixed.learning_rate"),
    (lambda s: s["search"].update(lr={"lognormal": [1, 2]}), "search.lr must be one of"),
    (lambda s: s["search"].update(lr={"loguniform": [1e-2, 1e-4]}), "low < high"),
    (lambda s: s["resources"].update(gpus=1), "unknown key\\(s\\) resources.gpus"),
    (lambda s: s["fixed"].update(depth=21), "--depth 21 is not 6n\\+2"),
    (lambda s: s["search"].update(lr_policy={"choice": ["keras", "cosine"]}), "--lr-policy must be"),
    (lambda s: s["scheduler"].update(type="pbt"), "scheduler.type must be"),
])
def test_bad_sweep_yaml_is_one_line_user_error(tmp_path, mutate, message):
    spec = yaml.safe_load(SMOKE.read_text())
    mutate(spec)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match=message) as e:
        load_sweep(str(path))
    assert "\n" not in str(e.value)


def test_bad_yaml_on_the_command_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("fixed: {epochs: 2}\nnum_sampels: 3\n")
    proc = run_cli("tune", "--config", str(path), "--storage-path", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "unknown key(s) num_sampels" in proc.stderr and "Traceback" not in proc.stderr


def test_sweep_resumes_after_driver_killed_and_picks_best_by_val(tmp_path, mini_dir):
    """A real 2-trial ASHA sweep, killed during trial 2, resumed; then the selection and best.json."""
    config = write_sweep(tmp_path, mini_dir, num_samples=2, max_concurrent_trials=1)
    trials_dir = tmp_path / "s" / "trials"
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "distributed_resnet.tune", "--config", str(config),
                               "--storage-path", str(tmp_path), "--name", "s"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    finished = started = None
    while time.time() < deadline and driver.poll() is None:
        done = sorted(trials_dir.glob("*/checkpoint_epoch_0002/meta.json")) if trials_dir.is_dir() else []
        if done:
            finished = done[0].parents[1]
            started = [d for d in trials_dir.iterdir() if d != finished and any(d.glob("checkpoint_epoch_0001"))]
            if started:
                break
        time.sleep(0.5)
    assert finished and started, "the sweep did not reach the second trial in time"
    stamp = {p: p.stat().st_mtime_ns for p in finished.rglob("checkpoint.pt")}
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
    driver.wait()
    time.sleep(2)

    proc = run_cli("tune", "--config", str(config), "--storage-path", str(tmp_path), "--name", "s", "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("checkpoint.pt")} == stamp  # not rerun
    assert "best trial" in proc.stdout and "val_accuracy" in proc.stdout  # the table
    trials = json.loads((tmp_path / "s" / "trials.json").read_text())
    assert len(trials) == 2 and all(t["status"] == "done" and t["epochs"] >= 1 for t in trials)  # ASHA may stop one
    assert trials[0]["val_accuracy"] >= trials[1]["val_accuracy"]  # sorted by validation accuracy
    best = json.loads((tmp_path / "s" / "best.json").read_text())
    assert best["trial_id"] == trials[0]["trial_id"] and best["val_accuracy"] == trials[0]["val_accuracy"]
    assert Path(best["checkpoint"], "checkpoint.pt").is_file()
    assert 0 <= best["test_accuracy"] <= 1 and set(best["config"]) >= {"lr", "lr_policy", "plateau_patience"}
    # The selected checkpoint is the best-val epoch of the best trial; test accuracy played no part in it.
    meta = json.loads(Path(best["checkpoint"], "meta.json").read_text())
    assert meta["metrics"]["val_accuracy"] == best["val_accuracy"] and meta["metrics"]["test_accuracy"] is None
    # Without --resume the sweep folder is refused.
    again = run_cli("tune", "--config", str(config), "--storage-path", str(tmp_path), "--name", "s")
    assert again.returncode == 2 and "already exists" in again.stderr
