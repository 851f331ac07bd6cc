"""The paths a cluster user takes, run on this machine: a Ray head started the way cluster.yaml starts it (token
authentication, the dashboard on loopback), jobs submitted to it with `ray job submit`, and s3:// storage served
by a local S3 server (moto) on 127.0.0.1, reached through pyarrow's real S3 filesystem."""

from __future__ import annotations

import json
import re
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO, kill_with_everything_it_started, run_cli

BIN = Path(sys.executable).parent
PUBLISHED = REPO / "results" / "resnet20v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(ready, what: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while not ready():
        if time.time() > deadline:
            raise TimeoutError(f"{what} did not come up in {timeout:.0f} s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def s3():
    """A local S3 server; the AWS variables point every process started from here (Ray's too) at it."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        def bucket_made():
            try:
                urllib.request.urlopen(urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/runs", method="PUT"), timeout=2)
                return True
            except OSError:  # refused, reset, or a server still starting that answers after the timeout
                return False

        wait_for(bucket_made, "the S3 server")
        yield "s3://runs"
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        server.terminate()
        server.wait(timeout=30)


def read_s3(uri: str) -> bytes:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def head(s3, tmp_path_factory):
    """`ray start --head` as cluster.yaml's head_start_ray_commands runs it (the same RAY_AUTH_MODE export and
    --dashboard-host), with the token where its file_mounts put it (~/.ray/auth_token). Only on 127.0.0.1, on free
    ports, with a temp dir of its own so that no other test's `ray.init()` finds it."""
    command = yaml.safe_load((REPO / "cluster.yaml").read_text())["head_start_ray_commands"][1]
    exports = dict(part.split()[1].split("=", 1) for part in command.split(";") if part.strip().startswith("export "))
    dashboard_host = next(a.split("=", 1)[1] for a in command.split() if a.startswith("--dashboard-host="))
    assert exports == {"RAY_AUTH_MODE": "token"} and dashboard_host == "127.0.0.1"
    home = tmp_path_factory.mktemp("head_home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    env = {**os.environ, **exports, "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayhead_", dir="/tmp")  # short: Ray's socket paths must stay short
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-host={dashboard_host}",
         f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def dashboard_answers():
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/version", timeout=2)
        except urllib.error.HTTPError:
            return True  # it answers, if only to refuse: it is up
        except OSError:  # not listening yet, or too slow to answer (URLError, ConnectionError, TimeoutError)
            return False
        return True

    try:
        wait_for(dashboard_answers, "the Ray head's dashboard", timeout=120)
        yield types.SimpleNamespace(gcs=f"127.0.0.1:{gcs}", jobs=f"http://127.0.0.1:{dashboard}", env=env, home=home)
    finally:
        kill_with_everything_it_started(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_job(head, *args, env=None, timeout=600):
    return subprocess.run([str(BIN / "ray"), "job", "submit", "--address", head.jobs, *args], capture_output=True,
                          text=True, env=env or head.env, timeout=timeout, cwd=REPO)


def test_the_jobs_api_refuses_a_job_without_the_token(head, tmp_path):
    marker = tmp_path / "it_ran"
    job = ["--", "python", "-c", f"open({str(marker)!r}, 'w')"]
    stranger = {**head.env, "HOME": str(tmp_path)}
    stranger.pop("RAY_AUTH_MODE")
    proc = ray_job(head, *job, env=stranger, timeout=120)
    assert proc.returncode != 0 and "Unauthorized" in proc.stdout + proc.stderr
    # The token file alone is not enough on the submitting side: `export RAY_AUTH_MODE=token` (cluster.yaml says so).
    proc = ray_job(head, *job, env={**stranger, "HOME": str(head.home)}, timeout=120)
    assert proc.returncode != 0 and "Unauthorized" in proc.stdout + proc.stderr
    assert not marker.exists()
    proc = ray_job(head, *job, timeout=120)  # with the token, as cluster.yaml tells a user
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert marker.exists()


def _one_line(proc, *fragments):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_a_run_on_s3_through_the_cluster(head, s3, tmp_path, mini_dir):
    """A driver joining the cluster with --address and writing to S3. Its --init-weights is a path only the driver
    can read (relative to the driver's folder; Ray's workers run elsewhere): the weights travel through the object
    store. Then the same name without --resume, and resumes of another architecture or recipe, are refused on the
    driver, in one line, before any worker starts; so are more workers than the cluster holds (Ray Train would
    wait for them forever), without leaving a run folder behind."""
    shutil.copytree(PUBLISHED, tmp_path / "weights", ignore=shutil.ignore_patterns("*.png"))
    args = ["--address", head.gcs, "--num-workers", "1", "--epochs", "1", "--data-dir", mini_dir,
            "--max-train-samples", "128", "--val-size", "100", "--storage-path", f"{s3}/runs", "--name", "r1"]
    proc = run_cli("train", *args, "--init-weights", "weights", env=head.env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(read_s3(f"{s3}/runs/r1/results.json"))
    assert results["best_checkpoint"] == f"{s3}/runs/r1/checkpoint_epoch_0001"
    assert results["history"][0]["val_accuracy"] > 0.5  # it started from the trained weights (from scratch: ~15%)

    _one_line(run_cli("train", *args, env=head.env, cwd=tmp_path), f"{s3}/runs/r1 already exists", "--resume")
    resume = [*args, "--resume", "--epochs", "2"]
    _one_line(run_cli("train", *resume, "--depth", "32", env=head.env, cwd=tmp_path),
              "is ResNet-20 v1, but this run is ResNet-32 v1")
    _one_line(run_cli("train", *resume, "--lr", "0.002", env=head.env, cwd=tmp_path), "--lr 0.001 (not 0.002)")

    big = [*args[:2], "--num-workers", "8", *args[4:-1], "big"]
    _one_line(run_cli("train", *big, env=head.env, cwd=tmp_path), "8 worker(s) x 1 CPU do not fit on this Ray cluster "
              "(2 CPU and 0 GPU)", "--num-workers")
    from distributed_resnet import storage

    assert storage.has_files(f"{s3}/runs/r1") and not storage.has_files(f"{s3}/runs/big")


def test_the_readme_cluster_section_runs_against_a_head_started_as_cluster_yaml_does(head, s3, tmp_path, mini_dir):
    """The README's cluster commands, in order. `ray up`, `ray dashboard` and `ray down` need AWS: the `head`
    fixture starts Ray as cluster.yaml's head_start_ray_commands do (test_cluster_yaml.py validates the file with
    Ray's own schema). The rest runs as written, except what points at AWS or outgrows this 2-CPU, GPU-less head:
    the Jobs address, the bucket and the data folder become local ones, `--gpu` becomes `--no-gpu`, a job gets 1
    worker and 2 trials at a time, and `--fast-dev-run` shrinks it to a minute."""
    import ray
    import ray.train

    sys.path.insert(0, str(REPO / "tests"))
    from readme_blocks import commands

    pip, token, up, dashboard, export, train, tune, down = commands("Cluster")
    assert pip[:2] == ["pip", "install"] and f"ray[default]=={ray.__version__}" in pip  # the driver's Ray
    assert [up[:3], dashboard[:3], down[:3]] == [["ray", x, "cluster.yaml"] for x in ("up", "dashboard", "down")]

    laptop = tmp_path / "laptop"
    laptop.mkdir()
    proc = subprocess.run([str(BIN / "ray"), *token[1:]], env={**os.environ, "HOME": str(laptop)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and (laptop / ".ray" / "auth_token").stat().st_size > 16, proc.stderr

    assert export == ["export", "RAY_AUTH_MODE=token"]
    env = {**head.env, "RAY_AUTH_MODE": "token"}
    local = {"http://127.0.0.1:8265": head.jobs, "/home/ubuntu/cifar10": mini_dir, "--gpu": "--no-gpu"}

    def submit(argv, *extra):
        argv = [local.get(a, a).replace("s3://YOUR-BUCKET", s3) for a in argv]
        proc = subprocess.run([str(BIN / "ray"), *argv[1:], *extra, "--fast-dev-run"], capture_output=True,
                              text=True, env=env, timeout=600, cwd=REPO)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "succeeded" in out, out[-3000:]
        return out

    workers = train.index("--num-workers")
    train[workers + 1] = "1"
    out = submit(train)
    assert re.search(rf"results: {s3}/runs/resnet20v1_\S+/results.json", out), out[-2000:]
    # The sweep as a job: its entrypoint has RAY_ADDRESS set, so the sweep joins the cluster without asking for
    # CPUs; on S3 the checkpoint paths Ray reports have no scheme, and best.json must still name one that opens.
    out = submit(tune, "--gpus-per-worker", "0", "--max-concurrent-trials", "2")
    assert "best trial" in out and "[2/2]" in out
    assert "full length (unconfirmed): python -m distributed_resnet.train --recipe keras --epochs 200" in out
    sweep = re.search(rf"best config and checkpoint: ({s3}/runs/\S+)/best.json", out).group(1)
    best = json.loads(read_s3(f"{sweep}/best.json"))
    assert best["checkpoint"].startswith(f"{sweep}/trials/") and 0 <= best["test_accuracy"] <= 1
    trials = json.loads(read_s3(f"{sweep}/trials.json"))
    assert len(trials) == 2 and all(t["checkpoint"].startswith("s3://") for t in trials)
    from distributed_resnet import checkpoint as ckpt

    with ray.train.Checkpoint(best["checkpoint"]).as_directory() as folder:
        assert ckpt.load(folder)["meta"]["depth"] == 20
