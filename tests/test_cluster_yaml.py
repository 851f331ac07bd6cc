"""cluster.yaml: valid for Ray's own cluster launcher, and able to hold the jobs its comments tell people to run.

Everything here is offline: Ray's schema and default-filling code (no AWS calls, no credentials), the project's
own CLIs parsing the documented commands (with the training itself replaced), and pyproject.toml.
"""

from __future__ import annotations

import copy
import math
import shlex
import socket
import sys
import tomllib
import types
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"

# vCPUs and GPUs of the instance types the config may name (what Ray would detect through the EC2 API).
KNOWN_INSTANCES = {
    "m5.xlarge": (4, 0), "m5.2xlarge": (8, 0), "m5.4xlarge": (16, 0),
    "g5.xlarge": (4, 1), "g5.2xlarge": (8, 1), "g5.4xlarge": (16, 1), "g5.12xlarge": (48, 4),
    "g6.xlarge": (4, 1), "g6.2xlarge": (8, 1), "g4dn.xlarge": (4, 1), "g4dn.2xlarge": (8, 1),
    "p3.2xlarge": (8, 1),
}


@pytest.fixture
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection (AWS, PyPI, ...) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)


def documented_command(module: str) -> list[str]:
    """The arguments after `python -m distributed_resnet.<module>` in cluster.yaml's comments (the only one)."""
    commands = documented_commands(module)
    assert len(commands) == 1, f"expected one documented `python -m distributed_resnet.{module}` command"
    return commands[0]


def documented_commands(module: str) -> list[list[str]]:
    """The arguments after `python -m distributed_resnet.<module>` of each such command in cluster.yaml's comments."""
    lines, pending = [], ""
    for raw in CLUSTER_YAML.read_text().splitlines():
        stripped = raw.strip()
        if not stripped.startswith("#"):
            continue
        text = stripped.lstrip("#").strip()
        if text.endswith("\\"):  # a command continued on the next comment line
            pending += text[:-1] + " "
            continue
        lines.append(pending + text)
        pending = ""
    target = f"distributed_resnet.{module}"
    hits = [line for line in lines if target in line.split()]
    assert hits, f"no documented `python -m {target}` command in cluster.yaml"
    commands = []
    for hit in hits:
        tokens = shlex.split(hit)
        assert tokens[:3] == ["ray", "job", "submit"], f"the documented command should be a Ray Job: {hit}"
        commands.append(tokens[tokens.index(target) + 1:])
    return commands


def node_capacity(node: dict, bundle: dict) -> int:
    """How many copies of `bundle` fit on one node of this type (by its declared resources)."""
    have = node.get("resources", {})
    fits = [math.floor(have.get(key, 0) / need + 1e-9) for key, need in bundle.items() if need > 0]
    return min(fits) if fits else math.inf


def max_bundles(config: dict, bundle: dict) -> int:
    """The most copies of `bundle` the fully scaled-up cluster holds: the head plus the best worker nodes,
    within each type's max_workers and the global max_workers."""
    types_ = config["available_node_types"]
    head = config["head_node_type"]
    total = node_capacity(types_[head], bundle)
    budget = config["max_workers"]
    workers = sorted(((node_capacity(t, bundle), t.get("max_workers", budget)) for name, t in types_.items()
                      if name != head), reverse=True)
    for per_node, count in workers:
        used = min(count, budget)
        total += per_node * used
        budget -= used
    return total


def setup_requirements(commands: list[str]) -> dict[str, Requirement]:
    reqs = {}
    for command in commands:
        tokens = shlex.split(command)
        if tokens[:2] != ["pip", "install"] or "-e" in tokens:
            continue
        for token in tokens[2:]:
            if not token.startswith("-"):
                req = Requirement(token)
                reqs[req.name.lower()] = req
    return reqs


# --- Ray's own validation -------------------------------------------------------------------------


def test_raw_config_passes_rays_schema(config, no_network):
    from ray.autoscaler._private.util import validate_config

    validate_config(config)


def test_prepared_config_passes_rays_schema_offline(config, no_network):
    """prepare_config is what `ray up` runs before any AWS call: defaults merged, setup commands merged."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["provider"] == {**config["provider"], "type": "aws", "region": "us-west-2"}
    assert prepared["cluster_name"] == "distributed-resnet"
    assert prepared["head_node_type"] == config["head_node_type"]
    assert set(prepared["available_node_types"]) == set(config["available_node_types"])
    assert prepared["head_setup_commands"] == config["setup_commands"] + config["head_setup_commands"]
    assert prepared["worker_setup_commands"] == config["setup_commands"] + config["worker_setup_commands"]
    assert prepared["available_node_types"]["gpu_worker"]["max_workers"] == 1
    assert prepared["available_node_types"]["gpu_spot_worker"]["max_workers"] == 3


# --- node types -----------------------------------------------------------------------------------


def test_head_has_cpus_but_no_gpu(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head must not offer GPUs: training workers belong on GPU nodes"
    assert head["resources"].get("CPU", 0) > 0, "the head keeps its CPUs for the driver"
    assert head.get("max_workers", 0) == 0


def test_gpu_worker_node_type(config):
    gpu, spot = config["available_node_types"]["gpu_worker"], config["available_node_types"]["gpu_spot_worker"]
    assert gpu["resources"] == spot["resources"] == {"CPU": 4, "GPU": 1}
    assert 1 <= gpu["min_workers"] <= gpu["max_workers"] <= config["max_workers"]
    assert gpu["max_workers"] + spot["max_workers"] == config["max_workers"]
    assert config["max_workers"] == 4 and config["idle_timeout_minutes"] == 10


def test_declared_resources_match_the_instances(config):
    for name, node in config["available_node_types"].items():
        instance = node["node_config"]["InstanceType"]
        if instance not in KNOWN_INSTANCES:
            continue
        cpus, gpus = KNOWN_INSTANCES[instance]
        assert node["resources"].get("CPU", cpus) <= cpus, f"{name}: more CPUs declared than {instance} has"
        assert node["resources"].get("GPU", gpus) <= gpus, f"{name}: more GPUs declared than {instance} has"


def test_every_node_runs_the_same_image(config):
    """One AMI everywhere: Ray needs the same Python on every node; and never Ray's old `latest_dlami` default."""
    images = {node["node_config"].get("ImageId") for node in config["available_node_types"].values()}
    assert len(images) == 1 and None not in images
    assert images != {"latest_dlami"}


def test_gpu_workers_get_an_instance_profile(config):
    """The Train workers write checkpoints to S3 themselves: without a profile they have no credentials."""
    for name in ("gpu_worker", "gpu_spot_worker"):
        assert "IamInstanceProfile" in config["available_node_types"][name]["node_config"]


# --- the documented commands fit ------------------------------------------------------------------


def parse_train_command(monkeypatch, args: list[str]):
    """Run the real `distributed_resnet.train` CLI on `args`, with the training (and the checks of its s3:// folder,
    which would reach out to S3) replaced: returns the TrainConfig."""
    from distributed_resnet import train

    seen = {}

    def fake_fit(cfg, address=None, verbose=False, quiet=False):
        seen["cfg"] = cfg
        return types.SimpleNamespace(summary={"stopped": None, "best_checkpoint": "s3://bucket/checkpoint"})

    monkeypatch.setitem(sys.modules, "distributed_resnet.api", types.SimpleNamespace(fit=fake_fit))
    monkeypatch.setitem(sys.modules, "distributed_resnet.driver", types.SimpleNamespace(
        Interrupted=type("Interrupted", (Exception,), {})))
    monkeypatch.setattr(train, "check_before_start", lambda cfg: None)
    try:
        assert train.main(args) == 0
    except SystemExit as e:  # argparse rejected a flag: the comment documents a command that cannot run
        pytest.fail(f"`python -m distributed_resnet.train {shlex.join(args)}` is rejected by the CLI (exit {e.code})")
    return seen["cfg"]


@pytest.mark.parametrize("which", ["fixed", "elastic"])
def test_documented_training_command_fits_the_gpu_nodes(config, monkeypatch, which):
    commands = documented_commands("train")
    assert len(commands) == 2
    cfg = parse_train_command(monkeypatch, commands[which == "elastic"])
    assert (cfg.min_workers is not None) == (which == "elastic")
    if cfg.min_workers:  # the elastic run's minimum fits on the on-demand node(s) alone
        worker = {"CPU": cfg.cpus_per_worker, "GPU": 1}
        gpu = config["available_node_types"]["gpu_worker"]
        assert gpu["min_workers"] * node_capacity(gpu, worker) >= cfg.min_workers
        spot = config["available_node_types"]["gpu_spot_worker"]
        assert spot["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" and spot["min_workers"] == 0
    assert cfg.use_gpu, "the documented training command should ask for GPUs: the cluster's workers are GPU nodes"
    assert cfg.storage_path.startswith("s3://"), "multi-node Ray Train needs shared storage: --storage-path s3://..."
    assert cfg.num_workers >= 2
    worker = {"CPU": cfg.cpus_per_worker, "GPU": getattr(cfg, "gpus_per_worker", 1)}
    types_ = config["available_node_types"]
    assert node_capacity(types_[config["head_node_type"]], worker) == 0, "a training worker could land on the head"
    assert max_bundles(config, worker) >= cfg.num_workers, (
        f"--num-workers {cfg.num_workers} x {worker} does not fit into the fully scaled cluster"
    )


def test_documented_sweep_fits_and_its_config_exists(config, monkeypatch):
    tuner = pytest.importorskip("distributed_resnet.sweeps.tuner")
    from distributed_resnet.sweeps.cli import main
    seen = {}

    def fake_run_sweep(spec, data_dir, storage_path, name, *args, **kwargs):
        seen.update(spec=spec, storage_path=storage_path)
        return None, {"experiment_path": f"{storage_path}/{name}", "wall_seconds": 0.0, "metric": "val_accuracy",
                      "trials": []}

    monkeypatch.setattr(tuner, "run_sweep", fake_run_sweep)
    import distributed_resnet.sweeps.cli as sweep_cli  # the s3:// folder and the head's data: not reachable here

    monkeypatch.setattr(sweep_cli, "guard_folder", lambda *a: None)
    monkeypatch.setattr(sweep_cli, "find_source", lambda *a: None)
    monkeypatch.chdir(REPO)  # --working-dir . : the config path is relative to the repository root
    args = documented_command("tune")
    try:
        main(args)
    except SystemExit as e:
        pytest.fail(f"`python -m distributed_resnet.tune {shlex.join(args)}` is rejected by the CLI (exit {e.code})")
    spec, storage_path = seen["spec"], seen["storage_path"]
    assert storage_path.startswith("s3://"), "multi-node trials need shared storage: --storage-path s3://..."
    res = spec.get("resources") or {}
    worker = {"CPU": res.get("cpus_per_worker", 1), "GPU": res.get("gpus_per_worker", 0)}
    concurrent = spec.get("max_concurrent_trials") or 1
    needed = concurrent * res.get("num_workers", 1)
    assert max_bundles(config, worker) >= needed, (
        f"{concurrent} concurrent trials x {res.get('num_workers', 1)} workers x {worker} do not fit"
    )


def test_documented_commands_use_the_jobs_api_and_the_whole_lifecycle():
    text = CLUSTER_YAML.read_text()
    for phrase in ("ray up cluster.yaml", "ray dashboard cluster.yaml", "--address http://127.0.0.1:8265",
                   "--working-dir .", "aws s3 cp s3://", "results.json", "ray down cluster.yaml"):
        assert phrase in text, f"cluster.yaml's comments should mention {phrase!r}"


# --- setup: the same pinned dependencies as pyproject.toml -----------------------------------------


def test_setup_commands_install_exactly_the_drivers_ray(config):
    """pyproject allows Ray's patch releases (~=2.60.0); a cluster must run the driver's exact version (Ray refuses
    a driver of another version), so cluster.yaml pins ==, and that pin is the Ray installed here and allowed by
    pyproject. Other dependencies: the same specifiers as pyproject."""
    import ray

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    project = {Requirement(d).name.lower(): Requirement(d) for d in deps}
    installed = setup_requirements(config["setup_commands"])
    assert set(installed) == set(project), "setup_commands should install exactly pyproject's dependencies"
    ray_project, ray_setup = project["ray"], installed["ray"]
    assert [s.operator for s in ray_project.specifier] == ["~="], "pyproject.toml: a compatible-release Ray pin"
    assert str(ray_setup.specifier) == f"=={ray.__version__}", "cluster.yaml must install the driver's Ray exactly"
    assert ray_project.specifier.contains(ray.__version__)
    assert set(ray_project.extras) <= set(ray_setup.extras), "setup_commands drop one of pyproject's Ray extras"
    assert "default" in ray_setup.extras, "cluster nodes need ray[default]: dashboard, Jobs API, autoscaler"
    assert f'"ray[default]=={ray.__version__}"' in CLUSTER_YAML.read_text().splitlines()[4]  # the driver's install
    for name, req in project.items():
        if name != "ray":
            assert str(installed[name].specifier) == str(req.specifier), f"{name}: {installed[name]} vs pyproject {req}"


def test_setup_installs_the_synced_repository(config):
    remote = next(r for r, local in config["file_mounts"].items() if local == ".")
    assert remote == "~/distributed_resnet"
    assert f"pip install -e {remote}" in config["setup_commands"]
    installs = [i for i, c in enumerate(config["setup_commands"]) if c.startswith("pip install")]
    assert config["setup_commands"][installs[-1]] == f"pip install -e {remote}", "the package goes in after its deps"


def test_start_commands_are_rays_standard_ones(config):
    head, worker = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    assert head[0] == worker[0] == "ray stop"
    assert "ray start --head --port=6379" in head[1] and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head[1]
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker[1]


def test_every_node_requires_the_token_and_the_dashboard_is_loopback_only(config):
    """Token authentication on every node, with the token file shipped where Ray looks for it; the dashboard and
    Jobs API bind the head's loopback (`ray dashboard cluster.yaml` tunnels to it). tests/test_cluster_auth.py
    starts a local head the same way and submits jobs to it."""
    head, worker = config["head_start_ray_commands"][1], config["worker_start_ray_commands"][1]
    for command in (head, worker):
        assert command.startswith("export RAY_AUTH_MODE=token;")
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    text = CLUSTER_YAML.read_text()
    assert "ray get-auth-token --generate" in text and "export RAY_AUTH_MODE=token" in text


# --- the real sweep fits one GPU node -------------------------------------------------------------


def test_lr_plateau_sweep_fills_one_gpu_node_exactly(config):
    """tune_configs/lr_plateau.yaml against this file: `max_concurrent_trials` trials run on ONE gpu_worker node
    (their Train workers' CPUs and GPU fractions fit its declared resources), and the trials' own processes
    (DRIVER_CPU each) are pinned to the head, which has the CPUs for them, so they take nothing from that node.
    (The autoscaler adds a node only for more concurrent trials, never for a trial's leftover half-GPU.)"""
    from distributed_resnet.sweeps.space import DRIVER_CPU, driver_resources
    from distributed_resnet.sweeps.spec import load_sweep, planned_trials

    spec = load_sweep(str(REPO / "tune_configs" / "lr_plateau.yaml"))
    res = spec["resources"]
    concurrent = spec["max_concurrent_trials"]
    types_ = config["available_node_types"]
    gpu_node, head = types_["gpu_worker"], types_[config["head_node_type"]]

    # The trial drivers: on the head, all of them at once.
    drivers = driver_resources(head["resources"]["CPU"], concurrent)
    assert "node:__internal_head__" in drivers, "trial drivers would compete with Train workers for GPU-node CPUs"
    assert concurrent * DRIVER_CPU <= head["resources"]["CPU"]

    # The Train workers of `concurrent` trials: on one GPU node, without a CPU or a GPU fraction left over.
    worker = {"CPU": res.get("cpus_per_worker", 1), "GPU": res.get("gpus_per_worker", 0)}
    workers = concurrent * res.get("num_workers", 1)
    assert worker["GPU"] > 0, "the sweep should train on the GPU nodes"
    assert node_capacity(gpu_node, worker) == workers, (
        f"one {gpu_node['node_config']['InstanceType']} ({gpu_node['resources']}) holds "
        f"{node_capacity(gpu_node, worker)} workers of {worker}, the sweep runs {workers} at once")
    assert workers * worker["CPU"] <= gpu_node["resources"]["CPU"]
    assert workers * worker["GPU"] <= gpu_node["resources"]["GPU"] + 1e-9
    assert node_capacity(head, worker) == 0, "a trial's worker could land on the GPU-less head"
    # More trials than fit at once queue up; the whole sweep is worth more than one node's worth of trials.
    assert planned_trials(spec) > concurrent
    # Each 30-epoch trial goes through the whole LR schedule in miniature, and the default recipe is a trial.
    assert spec["fixed"]["schedule_epochs"] == spec["fixed"]["epochs"]
