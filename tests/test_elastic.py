"""Elastic training through a preemption, on a real 2-node Ray cluster on this machine (`ray start --head` plus
`ray start --address`, one CPU each): `--num-workers 1:2` starts on both nodes; one node is drained as a spot
reclaim is (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`), the run saves a checkpoint part-way through
the epoch on the notice, the node goes, and the run finishes on the worker that remains, computing the bits an
uninterrupted 1-worker run computes (fp32, `--deterministic`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, kill_with_everything_it_started
from test_cluster_path import BIN, free_port, wait_for

# fp32 with --deterministic: the elastic run must compute the 1-worker run's bits (plain fp32 rounds each worker's
# sums on its own, and training amplifies that: the same comparison drifts to ~1e-3 in train loss within a few
# hundred steps, whatever the worker count).
EPOCHS = 5  # the drain's notice comes a few seconds after `ray drain-node` returns: epochs 2-5 (~20 s) let it land mid-run
TRAIN = ["--depth", "8", "--epochs", str(EPOCHS), "--max-train-samples", "512", "--val-size", "100", "--batch-size", "64",
         "--precision", "fp32", "--deterministic", "--seed", "3", "--max-failures", "0", "--preemption-check-steps", "1"]


@pytest.fixture
def two_nodes(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           # A restart first asks for the old size while the drained node is still leaving; give up on that sooner
           # than Ray's 60 s default.
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}
    env.pop("RAY_ADDRESS", None)
    gcs = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayel_", dir="/tmp")
    common = ["--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}"]
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={free_port()}",
                             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                             "--dashboard-host=127.0.0.1", *common],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nodes = [head]
    try:
        address = f"127.0.0.1:{gcs}"
        wait_for(lambda: _alive_nodes(address, env) == 1, "the head node")
        worker = subprocess.Popen([str(BIN / "ray"), "start", f"--address={address}",
                                   f"--dashboard-agent-listen-port={free_port()}", *common],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        nodes.append(worker)
        wait_for(lambda: _alive_nodes(address, env) == 2, "the second node")
        yield address, env, worker
    finally:
        for proc in reversed(nodes):
            if proc.poll() is None:
                kill_with_everything_it_started(proc)


def _nodes(address: str, env: dict) -> list[dict]:
    code = ("import json, ray; ray.init(address=%r, log_to_driver=False, logging_level='ERROR'); "
            "print(json.dumps([{'id': n['NodeID'], 'head': 'node:__internal_head__' in n['Resources']} "
            "for n in ray.nodes() if n['Alive']]))" % address)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []


def _alive_nodes(address: str, env: dict) -> int:
    return len(_nodes(address, env))


def _train(address, env, tmp_path, data_dir, name, workers):
    join = ["--address", address] if address else []
    return subprocess.Popen([sys.executable, "-m", "distributed_resnet.train", *join, "--num-workers", workers,
                             "--data-dir", data_dir, "--storage-path", str(tmp_path), "--name", name, *TRAIN],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


def test_an_elastic_run_survives_a_preempted_node_and_computes_the_one_worker_run(two_nodes, tmp_path, mini_dir):
    address, env, worker = two_nodes
    drained = next(n["id"] for n in _nodes(address, env) if not n["head"])  # before the run: a query takes seconds
    run = _train(address, env, tmp_path, mini_dir, "elastic", "1:2")
    lines = []
    for line in run.stdout:
        lines.append(line)
        if line.startswith("epoch 1/"):
            break
    assert lines and lines[-1].startswith("epoch 1/"), "".join(lines)
    subprocess.run([str(BIN / "ray"), "drain-node", "--address", address, "--node-id", drained, "--reason",
                    "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
                    "--deadline-remaining-seconds", "20"], check=True, env=env, timeout=60)
    run_dir = tmp_path / "elastic"
    wait_for(lambda: any(run_dir.glob("checkpoint_epoch_*_step_*/meta.json")), "the preemption checkpoint", 60)
    kill_with_everything_it_started(worker)  # the node goes, as a reclaimed spot instance does
    rest, _ = run.communicate(timeout=600)
    out = "".join(lines) + rest
    assert run.returncode == 0, out[-3000:]
    note = re.search(r"continuing from epoch (\d+)(?: step (\d+))? on 1 worker \(was 2\)", out)
    assert note, out[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    workers = [h["workers"] for h in results["history"]]
    # 2 workers of 1 CPU on two 1-CPU nodes: one on each node, then one on the node that stayed.
    assert workers[0] == 2 and workers[-1] == 1 and len(workers) == EPOCHS, workers
    if note.group(2):  # restored from the preemption checkpoint: that epoch went on from its step
        assert results["history"][int(note.group(1)) - 1]["resumed_at_step"] == int(note.group(2))

    reference = _train(None, env, tmp_path, mini_dir, "one_worker", "0")  # one process: Ray Train's local mode
    ref_out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, ref_out[-3000:]
    expected = json.loads((tmp_path / "one_worker" / "results.json").read_text())["history"]
    for got, want in zip(results["history"], expected, strict=True):
        for key in ("train_loss", "val_loss"):
            # The weights are the same bits; the epoch's loss is an fp64 sum over workers, its last digits their order's.
            assert abs(got[key] / want[key] - 1) < 1e-12, (got["epoch"], key, got[key], want[key])
