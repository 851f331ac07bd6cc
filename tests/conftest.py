"""Shared fixtures and helpers: the real CIFAR-10 (from $CIFAR10_DIR, else ../shared/cifar10), a private decode
cache, running the command-line tools, killing a driver with everything it started."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Absolute: tests run the tools from other folders (a job's working dir, a tmp_path), and the README's command
# gives a relative path (`CIFAR10_DIR=../shared/cifar10`). The tools' subprocesses inherit the absolute one.
CIFAR10_DIR = Path(os.environ.get("CIFAR10_DIR", REPO.parent / "shared" / "cifar10")).resolve()
os.environ["CIFAR10_DIR"] = str(CIFAR10_DIR)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Decoded arrays go to a per-session folder: each test session decodes the Parquet files itself."""
    folder = tmp_path_factory.mktemp("decode_cache")
    os.environ["DISTRIBUTED_RESNET_CACHE"] = str(folder)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return folder


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    if not (CIFAR10_DIR / "plain_text").is_dir():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR10_DIR}: set CIFAR10_DIR")
    return CIFAR10_DIR


@pytest.fixture(scope="session")
def mini_dir(cifar_root) -> str:
    return str(cifar_root / "mini")


def run_cli(module: str, *args: str, env: dict | None = None, timeout: float = 600, cwd=None):
    """Run `python -m distributed_resnet.<module> args` as a user would; returns CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", f"distributed_resnet.{module}", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=cwd or REPO)


def kill_with_everything_it_started(proc) -> None:
    """SIGKILL a driver (a Popen) and every process it started, at once, as when its machine goes down, and wait
    for them. Ray's workers have process groups of their own: a killpg of the driver's group alone leaves them
    running, and writing checkpoints, for a few seconds."""
    import psutil

    try:
        doomed = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:  # already gone (its children, if any, were reaped with it)
        proc.wait()
        return
    for stop in ("suspend", "kill"):
        for p in doomed:
            try:
                getattr(p, stop)()
            except psutil.NoSuchProcess:
                pass
    proc.wait()
    psutil.wait_procs(doomed[1:], timeout=30)
