"""Settings that mean the same at any length (patience, cooldown and ASHA's grace as fractions of the schedule),
the winner carried to the full length as a runnable `train` command, and a real sweep on the mini set with
`confirm:`, killed during the confirmation and resumed: Tune's restore, the selection by val and the verdict."""

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, kill_with_everything_it_started, run_cli
from distributed_resnet.cli import Parser, add_train_args, config_from_args
from distributed_resnet.config import TrainConfig
from distributed_resnet.errors import UserError
from distributed_resnet.schedule import LRPolicy
from distributed_resnet.sweeps.confirm import verdict_of
from distributed_resnet.sweeps.spec import (at_length, default_point, full_length, grace_epochs, load_sweep,
                                           scheduler_spec, train_command, trial_config)

SMOKE = REPO / "tune_configs" / "smoke.yaml"


def sweep_file(tmp_path, mini_dir=None, **overrides) -> Path:
    spec = yaml.safe_load(SMOKE.read_text())
    spec["fixed"].update(val_size=100, max_train_samples=128, **({"data_dir": mini_dir} if mini_dir else {}))
    for key, value in overrides.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_fractional_patience_and_cooldown_scale_with_the_schedule():
    reference = TrainConfig(plateau_patience_fraction=0.025, plateau_cooldown_fraction=0.01).validate()
    assert (reference.patience_epochs, reference.cooldown_epochs) == (5, 2)  # 200 epochs: the reference's 5
    short = TrainConfig(epochs=12, schedule_epochs=12, plateau_patience_fraction=0.25).validate()
    assert short.patience_epochs == 3 and LRPolicy.from_config(short).patience == 3
    assert TrainConfig(epochs=12, schedule_epochs=12, plateau_patience_fraction=0.01).patience_epochs == 1
    assert TrainConfig().patience_epochs == 5 and TrainConfig().cooldown_epochs == 0  # old configs: unchanged
    with pytest.raises(UserError, match="give one of them"):
        TrainConfig(plateau_patience=3, plateau_patience_fraction=0.1).validate()
    with pytest.raises(UserError, match="must be in \\(0, 1\\]"):
        TrainConfig(plateau_patience_fraction=1.5).validate()
    with pytest.raises(UserError, match="--plateau-cooldown-fraction must be in"):
        TrainConfig(plateau_cooldown_fraction=-0.5).validate()


def test_the_winner_at_full_length_is_a_train_command_that_parses_back(tmp_path):
    """An epoch-counted patience found on 12 epochs becomes its fraction, and the command builds that config."""
    path = sweep_file(tmp_path, fixed={"epochs": 12, "schedule_epochs": 12, "val_size": 5000})
    spec = load_sweep(str(path))
    assert full_length(spec) == 200  # the keras recipe's
    winner = {"lr": 0.003, "lr_policy": "compose", "plateau_patience": 3}
    values = at_length(spec, winner, 200)
    assert values["plateau_patience_fraction"] == 0.25 and values["plateau_patience"] == 5  # the field's default
    command = train_command(spec, values)
    assert command.startswith("python -m distributed_resnet.train --recipe keras --epochs 200 --schedule-epochs 200 ")
    parser = Parser()
    add_train_args(parser)
    parsed = config_from_args(parser.parse_args(command.split()[3:])).validate()
    wanted = TrainConfig.from_dict(trial_config(spec, values)).validate()
    assert parsed.epochs == parsed.schedule_epochs == 200 and parsed.patience_epochs == 50
    assert all(getattr(parsed, k) == getattr(wanted, k) for k in ("lr", "lr_policy", "plateau_patience_fraction",
                                                                  "val_size", "num_workers", "cpus_per_worker"))
    # The default recipe's patience (TrainConfig's 5) is the reference's 5 of 200 epochs, not 5 of the trials' 12.
    default = at_length(spec, {"lr": 1e-3, "lr_policy": "keras", "plateau_patience": 5}, 200, default=True)
    assert TrainConfig.from_dict(trial_config(spec, default)).patience_epochs == 5
    assert TrainConfig.from_dict(trial_config(spec, at_length(spec, default, 20, default=True))).patience_epochs == 1


def test_a_full_length_command_keeps_every_setting_with_a_flag_and_drops_the_search_subset(tmp_path):
    path = sweep_file(tmp_path, fixed={"epochs": 6, "max_train_samples": 20000, "adam_eps": 1e-8,
                                       "plateau_min_delta": 0.0, "eval_batch_size": 500})
    spec = load_sweep(str(path))
    command = train_command(spec, at_length(spec, {"lr": 0.002}, 200))
    assert "--max-train-samples" not in command  # the answer is for the whole training set
    parser = Parser()
    add_train_args(parser)
    parsed = config_from_args(parser.parse_args(command.split()[3:])).validate()
    assert (parsed.adam_eps, parsed.plateau_min_delta, parsed.eval_batch_size, parsed.lr) == (1e-8, 0.0, 500, 0.002)
    assert parsed.max_train_samples is None and parsed.epochs == 200


def test_fractions_in_a_sweep_file(tmp_path):
    path = sweep_file(tmp_path, fixed={"epochs": 6, "schedule_epochs": 6}, search={
        "lr": {"loguniform": [1e-4, 1e-2]}, "plateau_patience_fraction": {"uniform": [0.05, 0.5]}},
        scheduler={"type": "asha", "grace_fraction": 0.34, "reduction_factor": 3}, target_epochs=60)
    spec = load_sweep(str(path))
    assert default_point(spec) == {"lr": 1e-3, "plateau_patience_fraction": 5 / 200}  # the reference's, as a fraction
    assert grace_epochs(scheduler_spec(spec), 6, 6) == 2 and full_length(spec) == 60
    assert grace_epochs(scheduler_spec(load_sweep(str(SMOKE))), 2, 2) == 1  # old files: grace_period in epochs


@pytest.mark.parametrize("change, message", [
    ({"confirm": {"top_k": 5}}, "confirm.top_k 5 is more than the 3 searched trials"),
    ({"confirm": {"seeds": 0}}, "confirm.seeds must be an integer >= 1, got 0"),
    ({"confirm": {"epochs": 201}}, "confirm.epochs 201 is above the full length, 200 epochs"),
    ({"confirm": {"top_k": 1}, "target_epochs": 1, "fixed": {"epochs": 2}}, "target_epochs 1 is below the trials' 2"),
    ({"confirm": {"top_k": 1, "rounds": 2}}, "unknown key\\(s\\) confirm.rounds; allowed: epochs, seeds, top_k"),
    ({"confirm": {"top_k": 1}, "scheduler": {"type": "pbt", "perturbation_interval": 1, "mutate": ["lr"]}},
     "confirm re-runs configurations from scratch"),
    ({"scheduler": {"type": "asha", "grace_period": 2, "grace_fraction": 0.5}}, "grace_period .* give one of them"),
    ({"search": {"plateau_patience": {"randint": [1, 3]}, "plateau_patience_fraction": {"uniform": [0.1, 0.5]}}},
     "plateau_patience \\(epochs\\) and plateau_patience_fraction"),
])
def test_bad_confirm_and_fraction_settings_are_one_line_errors_before_ray(tmp_path, change, message):
    spec = yaml.safe_load(sweep_file(tmp_path).read_text())
    for key, value in change.items():
        spec[key] = {**spec[key], **value} if key == "fixed" else value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match=message) as e:
        load_sweep(str(path))
    assert "\n" not in str(e.value)
    proc = run_cli("tune", "--config", str(path), "--storage-path", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def _candidate(name: str, *vals: float | None) -> dict:
    scored = [v for v in vals if v is not None]
    return {"candidate": name, "default": name == "default recipe", "val_accuracys": scored,
            "median_val_accuracy": statistics.median(scored) if scored else None,
            "spread_val_accuracy": max(scored) - min(scored) if scored else None}


def test_the_verdict_needs_a_lead_larger_than_the_seed_spread():
    default = _candidate("default recipe", 0.898, 0.902)
    close = _candidate("search #1", 0.902, 0.904)
    clear = _candidate("search #2", 0.909, 0.911)
    text, pick, beats = verdict_of(close, default, "val_accuracy", 1)
    assert pick is default and not beats and "no more than the seeds' spread" in text and "use the default" in text
    text, pick, beats = verdict_of(clear, default, "val_accuracy", 1)
    assert pick is clear and beats and "beats the default recipe by more than the seeds' spread" in text
    assert verdict_of(default, default, "val_accuracy", 1)[1:] == (default, False)
    # One seed each measures no spread: a lead of any size is unconfirmed.
    text, pick, beats = verdict_of(_candidate("search #2", 0.95), _candidate("default recipe", 0.90), "val_accuracy", 1)
    assert pick["default"] and not beats and "seeds >= 2" in text
    # A default without a result confirms nothing against it.
    assert verdict_of(clear, _candidate("default recipe", None), "val_accuracy", 1)[2] is False


def test_a_sweep_killed_in_its_confirmation_resumes_without_rerunning_and_picks_best_by_val(tmp_path, mini_dir):
    """A real sweep: 2 ASHA trials of 1 epoch, then the best and the default x 2 seeds x 2 epochs as Tune trials.
    The driver is killed once a confirmed run has finished; --resume restores the Tune experiment and completes
    the rest without training that one again. Then the selection by val, best.json, trials.json and the table."""
    config = sweep_file(tmp_path, mini_dir, num_samples=2, max_concurrent_trials=2,
                        fixed={"epochs": 1, "data_dir": mini_dir, "val_size": 100, "max_train_samples": 128},
                        confirm={"top_k": 1, "seeds": 2, "epochs": 2})
    runs = tmp_path / "c" / "confirm_trials"
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "distributed_resnet.tune", "--config", str(config),
                               "--storage-path", str(tmp_path), "--name", "c"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline, done = time.time() + 400, []
    while time.time() < deadline and driver.poll() is None and not done:
        done = sorted(runs.glob("*/checkpoint_epoch_0002/meta.json")) if runs.is_dir() else []
        time.sleep(0.5)
    assert done, "no confirmed run finished in time"
    time.sleep(2)  # let Tune record the finished trial
    finished = done[0].parents[1]
    stamp = {p: p.stat().st_mtime_ns for p in finished.rglob("checkpoint.pt")}
    kill_with_everything_it_started(driver)
    first_out = driver.stdout.read().decode()
    assert ("2 trials (random search, asha scheduler; the first runs the default recipe) from " in first_out
            and "; then the top 1 and the default recipe, 2 fresh seeds each at 2 epochs" in first_out)
    assert "note: search.plateau_patience: the default 5 lies outside randint [1, 3]" in first_out

    proc = run_cli("tune", "--config", str(config), "--storage-path", str(tmp_path), "--name", "c", "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("checkpoint.pt")} == stamp  # not trained again
    assert len(list(runs.iterdir())) == 4
    assert "Trial status" not in first_out + proc.stdout  # Tune's own tables stay off
    assert "best trial" in proc.stdout and "vs default: the " in proc.stdout  # the table, and the comparison

    # The search: the default recipe was one of its trials, marked and compared; the best is picked by val.
    trials = json.loads((tmp_path / "c" / "trials.json").read_text())
    searched = [t for t in trials if t["stage"] == "search"]
    assert len(searched) == 2 and all(t["status"] in ("done", "stopped") and t["epochs"] == 1 for t in searched)
    default = [t for t in searched if t["default"]]
    assert len(default) == 1 and default[0]["config"] == {"lr": 1e-3, "lr_policy": "keras", "plateau_patience": 5}
    assert default[0]["vs_default"] == 0 and re.search(r"^\* " + default[0]["trial_id"][:13], proc.stdout, re.M)
    lines = [line for line in (first_out + proc.stdout).splitlines() if re.match(r"\[\d/2\] trial ", line)]
    for t in searched:  # one progress line per trial as it ended
        assert any(f"trial {t['trial_id']}" in line for line in lines), (t["trial_id"], lines)
    assert any(f"trial {default[0]['trial_id']} (default) " in line for line in lines)
    assert searched[0]["val_accuracy"] >= searched[1]["val_accuracy"]  # sorted by validation accuracy
    best = json.loads((tmp_path / "c" / "best.json").read_text())
    assert best["trial_id"] == searched[0]["trial_id"] and best["val_accuracy"] == searched[0]["val_accuracy"]
    assert Path(best["checkpoint"], "checkpoint.pt").is_file()
    assert 0 <= best["test_accuracy"] <= 1 and set(best["config"]) >= {"lr", "lr_policy", "plateau_patience"}
    assert best["default_trial_id"] == default[0]["trial_id"] and best["beats_default_by"] >= 0
    assert best["default_val_accuracy"] == default[0]["val_accuracy"] and best["vs_default"].startswith("the ")
    # The selected checkpoint is the best-val epoch of the best trial; test accuracy played no part in it.
    meta = json.loads(Path(best["checkpoint"], "meta.json").read_text())
    assert meta["metrics"]["val_accuracy"] == best["val_accuracy"] and meta["metrics"]["test_accuracy"] is None

    # The confirmation: read back on --resume, each candidate x 2 seeds at 2 epochs, a verdict against the spread.
    picked = json.loads((tmp_path / "c" / "confirm_candidates.json").read_text())
    confirmation = best["confirmation"]
    assert [c["candidate"] for c in confirmation["candidates"]] == [c["name"] for c in picked]
    assert confirmation["epochs"] == 2 and confirmation["seeds"] == [1, 2]
    assert [c["default"] for c in confirmation["candidates"]] == [False, True]
    for c in confirmation["candidates"]:
        assert c["runs"] == 2 and len(c["val_accuracys"]) == 2
        assert c["median_val_accuracy"] == pytest.approx(sum(c["val_accuracys"]) / 2)
        assert c["spread_val_accuracy"] == pytest.approx(max(c["val_accuracys"]) - min(c["val_accuracys"]))
        assert 0 <= c["median_test_accuracy"] <= 1
    assert confirmation["verdict"] and isinstance(confirmation["beats_default"], bool)
    assert best["recommended"]["train_command"].startswith("python -m distributed_resnet.train --recipe keras --epochs 200 ")
    confirmed = [t for t in trials if t["stage"] == "confirm"]
    assert len(confirmed) == 4
    assert all(t["epochs"] == 2 and 0 <= t["test_accuracy"] <= 1 and t["val_accuracy"] is not None for t in confirmed)
    # Each confirmed run trained with its own seed, at the confirmation's length.
    metas = [json.loads(Path(t["checkpoint"], "meta.json").read_text()) for t in confirmed]
    assert sorted(m["config"]["seed"] for m in metas) == [1, 1, 2, 2]
    assert all(m["config"]["epochs"] == m["config"]["schedule_epochs"] == 2 for m in metas)
    assert "verdict: " in proc.stdout and "median val" in proc.stdout
    # Without --resume the sweep folder is refused.
    again = run_cli("tune", "--config", str(config), "--storage-path", str(tmp_path), "--name", "c")
    assert again.returncode == 2 and "already exists" in again.stderr
