"""Every command in the README runs as written, on the tests' data, at a tiny size: `--fast-dev-run` appended to
each training and sweep command (1 epoch on a few hundred images; argparse takes the last value of a repeated
flag, so nothing else in a command changes). The cluster section's commands run against a local head in
tests/test_cluster_path.py; the install line is the one CI runs (.ci/run)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CIFAR10_DIR, REPO
from readme_blocks import README, blocks, commands, sections

BIN = Path(sys.executable).parent


def test_the_readme_is_short_and_in_a_newcomers_order():
    lines = README.read_text().splitlines()
    assert len(lines) <= 120
    assert sections() == ["Install", "Train", "Sweep", "Cluster", "Pretrained", "Where the code lives", "Docs"]
    text = README.read_text()
    assert "/work/" not in text and "/tmp/" not in text and not re.search(r"\bissue\b", text, re.I)
    for page in Path(REPO / "docs").glob("*.md"):
        assert "/work/" not in page.read_text(), f"{page.name} names a machine-local path"
        assert not re.search(r"\bissues? \d+|\(issue\b|the issue\b", page.read_text(), re.I), f"{page.name} cites an issue"


def test_the_install_line_is_the_one_ci_runs():
    (install, _), = [(cmd, None) for _, _, cmd in blocks("bash")[:1]]
    first = install.splitlines()[0]
    assert first == 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]"'
    assert first in (REPO / ".ci" / "run").read_text()


@pytest.fixture
def user_dir(tmp_path):
    """A user's working folder: the repository's tune_configs beside it, a HOME of its own (~/ray_results)."""
    (tmp_path / "tune_configs").symlink_to(REPO / "tune_configs")
    (tmp_path / "home").mkdir()
    env = {**os.environ, "HOME": str(tmp_path / "home"), "CIFAR10_DIR": str(CIFAR10_DIR),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return tmp_path, env


def run_section(section: str, folder: Path, env: dict) -> list[str]:
    outputs = []
    for argv in commands(section):
        if argv[0] == "export":  # the tests' data stands in for the user's: CIFAR10_DIR is set above
            continue
        if argv[:2] == ["python", "-m"] and argv[2] in ("distributed_resnet.train", "distributed_resnet.tune"):
            argv = argv + ["--fast-dev-run"]
        proc = subprocess.run([sys.executable if argv[0] == "python" else argv[0], *argv[1:]], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    return outputs


def test_the_train_section_runs_as_written(user_dir):
    folder, env = user_dir
    outs = run_section("Train", folder, env)
    assert len(outs) == 3 and all(re.search(r"^epoch +1/", out, re.M) and "best checkpoint" in out for out in outs)
    assert (folder / "home" / "ray_results" / "first-look" / "results.json").is_file()


def test_the_sweep_section_runs_as_written(user_dir):
    folder, env = user_dir
    mini, smoke, confirmed = run_section("Sweep", folder, env)
    assert "wrote 2,000 train and 500 test images" in mini
    assert "best trial" in smoke and "vs default" in smoke
    assert "verdict: " in confirmed and "full length: python -m distributed_resnet.train --recipe keras --epochs 200" in confirmed


def test_the_python_blocks_run_as_written():
    for section, _, code in blocks("python"):
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{section}: {proc.stderr[-3000:]}"
        assert re.search(r"tensor\(\[(\d, ){7}\d\]\)", proc.stdout), proc.stdout


def test_the_code_map_names_modules_that_exist():
    (code,) = [c for section, _, c in blocks("") if section == "Where the code lives"]
    package = True
    for line in code.splitlines():
        columns = re.split(r"\s{2,}", line.strip())
        if not line.startswith(" "):
            package = columns[0] == "distributed_resnet/"
        names = [n for n in re.split(r"[,\s]+", columns[-2]) if n and n != "..."]
        for name in names:
            path = REPO / "distributed_resnet" / name if package and name != "distributed_resnet/" else REPO / name
            assert path.exists() or path.with_suffix(".py").exists(), f"the code map names {name!r}: not found"
