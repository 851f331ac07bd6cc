"""The ecosystem's entry points: torch.hub (source="local"), `load_pretrained` by name from any working
directory, the console scripts of pyproject.toml, and $CIFAR10_DIR in TrainConfig as on the command line."""

import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import REPO

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_torch_hub_loads_the_shipped_models_from_another_directory(tmp_path, monkeypatch):
    import distributed_resnet
    from distributed_resnet.evaluate import load_model

    monkeypatch.chdir(tmp_path)
    fast = torch.hub.load(str(REPO), "resnet20", pretrained="fast", source="local", trust_repo=True)
    assert same_weights(fast, load_model(str(REPO / "results" / "resnet20v1_fast"))[0]) and not fast.training
    assert same_weights(distributed_resnet.load_pretrained(), fast)  # the default is the best shipped model
    reference = torch.hub.load(str(REPO), "resnet20", pretrained="reference", source="local", trust_repo=True)
    assert same_weights(reference, load_model(str(REPO / "results" / "resnet20v1"))[0])
    fresh = torch.hub.load(str(REPO), "resnet20", pretrained=False, source="local", trust_repo=True)
    images = torch.rand(4, 3, 32, 32)  # the documented input: RGB in [0, 1]
    assert fast(images).shape == fresh(images).shape == (4, 10)


def test_the_default_pretrained_model_is_the_best_selected_on_val():
    import json

    from distributed_resnet import PRETRAINED

    accuracy = {name: json.loads((REPO / "results" / folder / "results.json").read_text())
                for name, folder in PRETRAINED.items()}
    on_val = {n: r["test_accuracy"] for n, r in accuracy.items() if not r.get("val_is_test")}
    assert max(on_val, key=on_val.get) == "fast"


def test_an_unknown_shipped_name_is_a_path_and_a_missing_one_a_clear_error(tmp_path):
    from distributed_resnet import load_pretrained
    from distributed_resnet.errors import UserError

    with pytest.raises(UserError):
        load_pretrained(str(tmp_path / "nothing"))


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_scripts_run_from_any_directory(script, tmp_path):
    exe = Path(sysconfig.get_path("scripts")) / script
    assert exe.is_file(), f"{script} is not installed: pip install -e ."
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    module = SCRIPTS[script].split(":")[0]
    assert f"python -m {module}" in proc.stdout  # the same parser as `python -m`


def test_train_config_reads_cifar10_dir_like_the_command_line(monkeypatch):
    from distributed_resnet.cli import Parser, add_train_args, config_from_args
    from distributed_resnet.config import TrainConfig

    monkeypatch.setenv("CIFAR10_DIR", "/data/cifar")
    parser = Parser()
    add_train_args(parser)
    assert TrainConfig().data_dir == config_from_args(parser.parse_args([])).data_dir == "/data/cifar"
    monkeypatch.delenv("CIFAR10_DIR")
    assert TrainConfig().data_dir == "./data"
