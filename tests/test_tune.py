"""The Tune sweep: YAML checks, the default-recipe trial, progress lines, and a real PBT sweep on the mini set with
an exploit that restores (random search killed and resumed: test_confirm.py; Optuna TPE with ASHA: test_api.py)."""

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli
from distributed_resnet.errors import UserError
from distributed_resnet.sweeps.space import driver_resources, search_space
from distributed_resnet.sweeps.spec import (default_notes, default_point, load_sweep, planned_trials, scheduler_spec,
                                           trial_config)
from distributed_resnet.sweeps.summary import vs_default_text

SMOKE = REPO / "tune_configs" / "smoke.yaml"


def write_sweep(tmp_path, mini_dir, **overrides) -> Path:
    spec = yaml.safe_load(SMOKE.read_text())
    spec["fixed"].update(data_dir=mini_dir, val_size=100, max_train_samples=128)
    spec.update(overrides)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_shipped_configs_pass_the_schema():
    for path in sorted((REPO / "tune_configs").glob("*.yaml")):
        spec = load_sweep(str(path))
        assert spec["metric"] == "val_accuracy" and "lr" in spec["search"]
    for name in ("lr_plateau.yaml", "lr_plateau_cpu.yaml", "lr_plateau_full.yaml"):  # the mission's sweep: length-free
        spec = load_sweep(str(REPO / "tune_configs" / name))
        assert set(spec["search"]) >= {"lr", "lr_policy", "plateau_factor", "plateau_patience_fraction",
                                       "plateau_cooldown_fraction"}
        assert "grace_fraction" in spec["scheduler"] and not {"plateau_patience", "plateau_cooldown"} & set(
            spec["search"])
    assert load_sweep(str(REPO / "tune_configs" / "lr_plateau_full.yaml"))["confirm"]["epochs"] == 200
    spec = load_sweep(str(REPO / "tune_configs" / "lr_plateau.yaml"))
    assert spec["resources"]["gpus_per_worker"] < 1  # trials share a GPU
    assert trial_config(spec, {})["use_gpu"] is True
    assert spec["fixed"]["schedule_epochs"] == spec["fixed"]["epochs"]  # the whole recipe in miniature


def test_cpu_sweep_fits_two_cores_and_an_hour():
    spec = load_sweep(str(REPO / "tune_configs" / "cpu_sweep.yaml"))
    fixed, res = spec["fixed"], spec["resources"]
    assert 12 <= planned_trials(spec) <= 16 and 10 <= fixed["epochs"] <= 15
    assert fixed["schedule_epochs"] == fixed["epochs"]
    assert fixed["max_train_samples"] == 10000 and fixed["val_size"] == 5000
    assert spec["max_concurrent_trials"] * res["num_workers"] * res["cpus_per_worker"] <= 2
    assert res["gpus_per_worker"] == 0 and scheduler_spec(spec)["type"] == "asha"
    # The bound in its comments: every trial runs every epoch (ASHA stops none), at ~500 images/s per 1-thread
    # worker plus ~6 s of evaluation and reporting per epoch, two trials at a time, + ~10 s to start each trial.
    trial_epoch_s = fixed["max_train_samples"] / 500 + 6
    worst = (planned_trials(spec) * fixed["epochs"] * trial_epoch_s + planned_trials(spec) * 10) / 2
    assert worst < 3600 * 0.85, f"{worst / 60:.0f} min if ASHA stopped nothing"


def test_default_point_and_notes():
    spec = yaml.safe_load(SMOKE.read_text())
    spec["fixed"]["lr"] = 2e-3  # fixed overrides TrainConfig's default
    assert default_point(spec) == {"lr": 2e-3, "lr_policy": "keras", "plateau_patience": 5}
    notes = default_notes(spec)
    assert len(notes) == 1 and "plateau_patience" in notes[0] and "outside randint [1, 3]" in notes[0]
    # Optuna cannot enqueue a value missing from a categorical: the choice list gains the default.
    spec["search"]["lr_policy"] = {"choice": ["compose"]}
    space = search_space(spec, default_point(spec))
    assert space["lr_policy"].categories == ["compose", "keras"]
    assert search_space(spec)["lr_policy"].categories == ["compose"]  # random search: the point sets it
    # num_samples counts the default; a grid runs num_samples times, plus the default.
    assert planned_trials(spec) == 4
    spec["search"]["lr_policy"] = {"grid": ["keras", "compose"]}
    assert planned_trials(spec) == 9 and planned_trials(spec, 1) == 3


def test_fast_dev_run_shrinks_any_sweep_to_two_short_trials():
    from distributed_resnet.sweeps.spec import fast_dev_run

    spec = yaml.safe_load(SMOKE.read_text())
    spec.update(num_samples=5)
    spec["search"]["lr_policy"] = {"grid": ["keras", "compose"]}
    small = fast_dev_run(spec, "smoke.yaml")
    assert planned_trials(small) == 2 and small["fixed"]["epochs"] == 1
    spec["search"]["lr_policy"] = {"choice": ["keras", "compose"]}
    spec.update(scheduler={"type": "pbt", "perturbation_interval": 2, "mutate": ["lr"]}, max_concurrent_trials=5)
    small = fast_dev_run(spec, "smoke.yaml")  # PBT acts once: one epoch past its first perturbation
    assert planned_trials(small) == 2 and small["fixed"]["epochs"] == 3


def test_default_trial_marking_and_vs_default_text():
    from distributed_resnet.sweeps.progress import creation_index, default_trial_id
    from distributed_resnet.sweeps.space import clip_to_ranges

    tags = ("0", "1_lr=0.0010,lr_policy=keras", "3_lr=0.002@perturbed[lr=0.0016]")
    assert [creation_index(t) for t in tags] == [0, 1, 3]
    point = {"lr": 1e-3, "lr_policy": "keras"}
    trials = [("b", 2, dict(point)), ("a", 1, dict(point)), ("c", 0, {**point, "lr": 2e-3})]
    assert default_trial_id(trials, point, pbt=False) == "a"  # the first created with the default values
    assert default_trial_id(trials, point, pbt=True) == "c"  # PBT: the first created; mutations changed it
    assert default_trial_id(trials[2:], point, pbt=False) is None
    m = "val_accuracy"
    default = {"trial_id": "a_00000", m: 0.70, "status": "done"}
    better = {"trial_id": "a_00003", m: 0.7123, "status": "done"}
    assert vs_default_text(better, default, m, 1, False) == (
        "the best trial beats the default recipe by +1.23 points of val_accuracy (71.23% vs 70.00%)")
    assert vs_default_text(default, default, m, 1, False).startswith("the default recipe is the best trial")
    assert "does not beat" in vs_default_text({**better, m: 0.70}, default, m, 1, False)
    failed = {**default, m: None, "status": "error"}
    assert "reported no val_accuracy" in vs_default_text(better, failed, m, 1, False)
    assert "-0.0100 val_loss" not in vs_default_text({"trial_id": "b", "val_loss": 0.5},
                                                           {"trial_id": "a", "val_loss": 0.51}, "val_loss", -1, False)
    assert "+0.0100 val_loss" in vs_default_text({"trial_id": "b", "val_loss": 0.5},
                                                      {"trial_id": "a", "val_loss": 0.51}, "val_loss", -1, False)
    # PBT's explore step is clipped to the search range.
    assert clip_to_ranges({"lr": (1e-4, 1e-2, False), "plateau_patience": (1, 3, True)},
                          {"lr": 1.2e-2, "plateau_patience": 0.8, "lr_policy": "keras"}) == {
        "lr": 1e-2, "plateau_patience": 1, "lr_policy": "keras"}


def test_asha_lets_a_trial_end_by_itself_at_its_last_epoch():
    from ray.tune.schedulers import TrialScheduler

    from distributed_resnet.sweeps.space import FinalEpochASHA

    asha = FinalEpochASHA(3, time_attr="epoch", metric="val_accuracy", mode="max", max_t=3, grace_period=1)
    good, bad = _FakeTrial("x_00000", {"lr": 1e-3}, 0, 0), _FakeTrial("x_00001", {"lr": 1e-3}, 0, 0)
    for t in (good, bad):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, good, {"epoch": 1, "val_accuracy": 0.9}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, bad, {"epoch": 1, "val_accuracy": 0.1}) == TrialScheduler.STOP  # mid-run
    assert asha.on_trial_result(None, good, {"epoch": 3, "val_accuracy": 0.9}) == TrialScheduler.CONTINUE  # not STOP


def test_trial_drivers_go_to_the_head_when_it_has_room():
    assert driver_resources(8, 4) == {"CPU": 0.01, "node:__internal_head__": 0.01}
    assert driver_resources(0, 4) == {"CPU": 0.01}  # a head without CPUs: anywhere
    assert driver_resources(None, 4) == {"CPU": 0.01}


class _FakeTrial:
    def __init__(self, trial_id, config, epochs, best, status="RUNNING"):
        self.trial_id, self.config, self.status = trial_id, config, status
        self.experiment_tag = f"{int(trial_id[-1]) + 1}_lr={config['lr']}"
        self.metric_analysis = {"epoch": {"max": epochs}, "val_accuracy": {"max": best}}

    def get_pickled_error(self):
        return RuntimeError("Traceback ...\nTrialDiverged: the loss became nan at epoch 2")


def test_progress_lines_tell_finished_from_stopped_and_error(capsys):
    from distributed_resnet.sweeps.progress import ProgressLines

    point = {"lr": 1e-3, "lr_policy": "keras"}
    cb = ProgressLines("val_accuracy", "max", 4, point, 3, "asha")
    done = _FakeTrial("x_00000", dict(point), 4, 0.5)
    stopped = _FakeTrial("x_00001", {"lr": 3e-3, "lr_policy": "compose"}, 2, 0.25)
    failed = _FakeTrial("x_00002", {"lr": 9e-3, "lr_policy": "keras"}, 1, 0.1)
    trials = [done, stopped, failed]
    cb.on_trial_result(0, trials, done, {"epoch": 4, "done": False})  # ran out of epochs: Tune adds done later
    cb.on_trial_complete(0, trials, done)
    done.status = "TERMINATED"
    cb.on_trial_result(0, trials, stopped, {"epoch": 2, "done": True})  # ASHA's STOP marks the result itself
    cb.on_trial_complete(0, trials, stopped)
    stopped.status = "TERMINATED"
    cb.on_trial_error(0, trials, failed)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("[1/3] trial x_00000 (default) finished: 4/4 epochs, best val_accuracy 50.00% | "
                        "lr=0.001 lr_policy=keras")
    assert lines[1].startswith("[2/3] trial x_00001 stopped by ASHA: 2/4 epochs, best val_accuracy 25.00%")
    assert lines[2].startswith("[3/3] trial x_00002 error: 1/4 epochs") and "the loss became nan" in lines[2]


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s.update(epochz=3), "unknown key\\(s\\) epochz"),
    (lambda s: s["fixed"].update(learning_rate=0.1), "unknown key\\(s\\) fixed.learning_rate"),
    (lambda s: s["search"].update(lr={"lognormal": [1, 2]}), "search.lr must be one of"),
    (lambda s: s["search"].update(lr={"loguniform": [1e-2, 1e-4]}), "low < high"),
    (lambda s: s["resources"].update(gpus=1), "unknown key\\(s\\) resources.gpus"),
    (lambda s: s["fixed"].update(depth=21), "--depth 21 is not 6n\\+2"),
    (lambda s: s["search"].update(lr_policy={"choice": ["keras", "cosine"]}), "--lr-policy must be"),
    (lambda s: s["scheduler"].update(type="hyperband"), "scheduler.type must be"),
    (lambda s: s.update(num_samples=0), "num_samples must be an integer >= 1"),
    (lambda s: s.update(search_alg={"type": "hyperopt"}), "search_alg.type must be 'random' or 'optuna'"),
    (lambda s: s.update(search_alg={"type": "random", "n_startup_trials": 3}),
     "unknown key\\(s\\) search_alg.n_startup_trials with search_alg.type random"),
    (lambda s: s.update(search_alg={"type": "optuna", "seed": "x"}), "search_alg.seed must be an integer"),
    (lambda s: s.update(search_alg={"type": "optuna"}) or s["search"].update(lr_policy={"grid": ["keras"]}),
     "search.lr_policy uses grid, which search_alg optuna cannot sample"),
    (lambda s: s["scheduler"].update(mutate=["lr"]), "unknown key\\(s\\) scheduler.mutate with scheduler.type asha"),
    (lambda s: s["scheduler"].update(reduction_factor=1), "reduction_factor must be a number above 1"),
    (lambda s: s.update(scheduler={"type": "pbt"}), "scheduler pbt needs perturbation_interval"),
    (lambda s: s.update(scheduler={"type": "pbt", "perturbation_interval": 2}), "must be below the trials' epochs"),
    (lambda s: s.update(scheduler={"type": "pbt", "perturbation_interval": 1, "grace_period": 1}),
     "unknown key\\(s\\) scheduler.grace_period with scheduler.type pbt"),
    (lambda s: s.update(scheduler={"type": "pbt", "perturbation_interval": 1, "mutate": ["batch_size"]}),
     "PBT cannot change batch_size during training"),
    (lambda s: s.update(scheduler={"type": "pbt", "perturbation_interval": 1, "mutate": ["plateau_factor"]}),
     "mutate names plateau_factor, which is not in search"),
    (lambda s: s.update(scheduler={"type": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.7}),
     "quantile_fraction must be in \\(0, 0.5\\]"),
    (lambda s: s.update(scheduler={"type": "pbt", "perturbation_interval": 1}, search_alg={"type": "optuna"}),
     "scheduler pbt needs search_alg.type random"),
    (lambda s: s.update(scheduler={"type": "pbt", "perturbation_interval": 1}, num_samples=4, max_concurrent_trials=2),
     "trains its whole population at once: max_concurrent_trials \\(2\\) must be >= its 4 trials"),
])
def test_bad_sweep_yaml_is_one_line_user_error(tmp_path, mutate, message):
    spec = yaml.safe_load(SMOKE.read_text())
    mutate(spec)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match=message) as e:
        load_sweep(str(path))
    assert "\n" not in str(e.value)


def test_optuna_missing_is_one_line_user_error(tmp_path, monkeypatch):
    spec = yaml.safe_load(SMOKE.read_text())
    spec["search_alg"] = {"type": "optuna"}
    path = tmp_path / "optuna.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    with pytest.raises(UserError, match="pip install 'distributed-resnet\\[tune\\]'") as e:
        load_sweep(str(path))
    assert "\n" not in str(e.value)


def test_bad_yaml_on_the_command_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("fixed: {epochs: 2}\nnum_sampels: 3\n")
    proc = run_cli("tune", "--config", str(path), "--storage-path", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "unknown key(s) num_sampels" in proc.stderr and "Traceback" not in proc.stderr


def progress_lines(out: str, total: int) -> list[str]:
    return [line for line in out.splitlines() if re.match(rf"\[\d+/{total}\] trial ", line)]


def test_pbt_exploits_and_the_copy_restores_with_the_mutated_lr(tmp_path, mini_dir):
    """Synchronous PBT, 2 trials, an exploit after every epoch: the lower trial goes on from the upper one's
    checkpoint (weights, Adam, history) with a perturbed lr, which is the LR its next epoch trains at."""
    import pandas as pd
    import torch

    config = write_sweep(tmp_path, mini_dir, num_samples=2, max_concurrent_trials=2,
                         scheduler={"type": "pbt", "perturbation_interval": 1, "mutate": ["lr"],
                                    "quantile_fraction": 0.5, "resample_probability": 0.0, "synch": True})
    proc = run_cli("tune", "--config", str(config), "--storage-path", str(tmp_path), "--name", "p")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^PBT: [1-9]\d* exploit", proc.stdout, re.M), proc.stdout
    assert len(progress_lines(proc.stdout, 2)) == 2
    # Every trial's reported rows (progress.csv: Tune's result.json can lose rows when a trial restarts).
    rows = {f.parent.name: pd.read_csv(f).to_dict("records") for f in (tmp_path / "p").glob("*/progress.csv")}
    copied = [(trial, r) for trial, rs in rows.items() for r in rs  # from another trial's Tune checkpoint
              if isinstance(r.get("restored_from"), str) and Path(r["restored_from"]).parent.name in rows
              and Path(r["restored_from"]).parent.name != trial]
    assert copied, "no trial went on from another trial's checkpoint"
    trial, row = copied[0]
    seam = json.loads((Path(row["restored_from"]) / "meta.json").read_text())  # the donor's checkpoint
    assert row["segment_start"] == seam["epoch"] == 1 and row["epoch"] == 2
    state = torch.load(Path(row["checkpoint_path"]) / "checkpoint.pt", weights_only=False)
    assert state["history"][0] == seam["metrics"]  # the run went on from the donor's epoch 1
    # It trained epoch 2 at the donor's lr perturbed by PBT (x0.8 or x1.2; the step schedule is still at 1x).
    assert row["lr"] in (pytest.approx(seam["config"]["lr"] * 0.8), pytest.approx(seam["config"]["lr"] * 1.2))
    trials = json.loads((tmp_path / "p" / "trials.json").read_text())
    assert len(trials) == 2 and all(t["epochs"] == 2 and t["status"] == "done" for t in trials)
    assert sum(t["default"] for t in trials) == 1 and "under PBT" in proc.stdout
    best = json.loads((tmp_path / "p" / "best.json").read_text())
    assert Path(best["checkpoint"], "checkpoint.pt").is_file()


def test_init_weights_cannot_vary_with_what_they_must_fit(tmp_path, mini_dir):
    """One set of initial weights, loaded by the driver for the base architecture, starts every trial."""
    for fixed, search in (({"init_weights": "results/resnet20v1"}, {"padding": {"choice": ["same", "symmetric"]}}),
                          ({}, {"init_weights": {"choice": ["results/resnet20v1"]}})):
        path = write_sweep(tmp_path, mini_dir)
        spec = yaml.safe_load(path.read_text())
        spec["fixed"].update(fixed)
        spec["search"].update(search)
        path.write_text(yaml.safe_dump(spec))
        with pytest.raises(UserError, match="cannot vary with init_weights"):
            load_sweep(str(path))


def test_resource_flags_replace_the_files_and_are_checked_like_it(tmp_path):
    """`tune --gpus-per-worker ...` lays the same sweep out on other hardware; a bad value is the file's one-line
    error, naming the flag."""
    spec = load_sweep(str(SMOKE), {"num_workers": 2, "max_concurrent_trials": 1})
    assert spec["resources"]["num_workers"] == 2 and spec["max_concurrent_trials"] == 1
    assert trial_config(spec, {})["num_workers"] == 2
    assert load_sweep(str(SMOKE), {"num_workers": None}) == load_sweep(str(SMOKE))  # flags not given: the file
    proc = run_cli("tune", "--config", str(SMOKE), "--storage-path", str(tmp_path), "--gpus-per-worker", "-1")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "with --gpus-per-worker -1.0: resources.gpus_per_worker must be a number >= 0" in proc.stderr
    assert not list(tmp_path.iterdir())  # refused before anything started
    # Tune restores a sweep with the concurrency it was saved with: --resume keeps the layout.
    proc = run_cli("tune", "--config", str(SMOKE), "--storage-path", str(tmp_path), "--resume", "--num-workers", "2")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "--resume continues a sweep as it was laid out: drop --num-workers" in proc.stderr
