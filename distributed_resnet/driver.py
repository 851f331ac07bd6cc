"""The driver side of a training run: checks, data, Ray, `TorchTrainer.fit()`, and the results it leaves.

`fit_run(cfg)` is what `api.fit` (and so `python -m distributed_resnet.train`) calls; a Tune trial builds its
trainer with `build_trainer` itself (`sweeps.trials`). Every user error is raised as `UserError` before the first
worker starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings

import numpy as np

from . import checkpoint as ckpt
from . import storage
from .config import TrainConfig
from .errors import UserError
from .data import Cifar10, load_cifar10
from .device import local_device, precision_text
from .worker import train_loop_per_worker
from .preflight import check_before_start
from .report import ProgressPrinter, QueueDrain, curves_png, summary_lines
from .sharding import check_last_step_fits


def quiet_ray_logs(verbose: bool = False) -> None:
    """Ray's INFO chatter off unless --verbose: the driver prints its own one line per epoch."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="ray")


def init_ray(address: str | None = None, verbose: bool = False, extra_cpus: float = 0) -> None:
    """Start (or join) Ray with the workers' log stream off: the driver prints progress itself.

    `extra_cpus` adds logical CPUs to a local cluster for processes that only wait (Tune's trial drivers).
    """
    import ray

    if ray.is_initialized():
        return
    quiet_ray_logs(verbose)
    num_cpus = None if not extra_cpus or joins_a_cluster(address) else os.cpu_count() + extra_cpus
    try:
        ray.init(address=address, num_cpus=num_cpus, log_to_driver=verbose,
                 logging_level=logging.INFO if verbose else logging.ERROR,
                 runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}} if not verbose else None)
    except ConnectionError as e:  # a cluster named by --address or RAY_ADDRESS that does not answer, or refuses us
        raise UserError(f"{str(e).splitlines()[0]}: check --address (or RAY_ADDRESS) and that `ray start --head` "
                        "runs there; a cluster with token authentication also needs `export RAY_AUTH_MODE=token`"
                        ) from None


def joins_a_cluster(address: str | None) -> bool:
    """Whether `ray.init(address)` would join a running cluster rather than start one: an address, or none but
    RAY_ADDRESS (set in every Ray Job's entrypoint) or a `ray start` cluster on this machine. Ray refuses
    `num_cpus` then. The same lookup as `ray.init`'s own."""
    from ray._private.services import canonicalize_bootstrap_address

    return address not in (None, "local") or canonicalize_bootstrap_address(address) is not None


def prepare_run(cfg: TrainConfig) -> tuple[TrainConfig, str, str, dict | None]:
    """Validate, name the run, guard its folder, and read on the driver every file the workers would need.

    Returns (cfg with name set, storage root, run path, the --init-weights model state or None). A resumed run's
    newest checkpoint (local or remote) is loaded here too: it must be safe to load, of this architecture, and of
    this recipe. Workers then restore from the run folder, and take the initial weights from the object store,
    so nothing depends on a path that exists on the driver's node only.
    """
    cfg.validate()
    root, run_path = check_before_start(cfg)
    latest = storage.latest_checkpoint(run_path) if cfg.resume else None
    if latest is not None:
        with storage.local_copy(latest) as folder:
            meta = ckpt.load(folder)["meta"]
        ckpt.check_compatible(meta, cfg.depth, cfg.version, latest, cfg.padding)
        check_same_recipe(meta.get("config") or {}, cfg, latest)
    init_state = ckpt.load_weights(cfg.init_weights, cfg.depth, cfg.version, cfg.padding) if cfg.init_weights else None
    if cfg.num_workers == 0:
        local_device(cfg.use_gpu)  # --gpu without a GPU: say so before any work
    return cfg, root, run_path, init_state


# What a resumed run may change: how and where it runs, not what it computes.
MAY_CHANGE_ON_RESUME = {"precision", "compile", "cuda_graph", "deterministic", "use_gpu", "gpus_per_worker", "num_workers", "min_workers", "cpus_per_worker",
                        "max_failures", "preemption_check_steps",
                        "data_dir", "download", "storage_path", "name", "resume", "num_to_keep", "eval_batch_size", "test_every",
                        "report_test", "init_weights", "epochs", "batch_size", "per_worker_batch_size"}


# Settings that older checkpoints lack, at the value those runs trained with.
RECIPE_BEFORE_ITS_KEY = {"batchnorm": "local", "flip": "random",
                         "plateau_patience_fraction": None, "plateau_cooldown_fraction": None}


def check_same_recipe(saved: dict, cfg: TrainConfig, where: str) -> None:
    """Refuse a --resume whose recipe differs from the checkpoint's (a new val split would train on former val
    images; a new LR or schedule would change the run silently). Keys older checkpoints lack are not compared."""
    now = cfg.to_dict()
    saved = {**RECIPE_BEFORE_ITS_KEY, **saved}
    changed = [f"--{k.replace('_', '-')} {saved[k]} (not {now[k]})" for k in sorted(saved)
               if k in now and k not in MAY_CHANGE_ON_RESUME and saved[k] != now[k]]
    if saved.get("epochs") is not None and cfg.epochs < saved["epochs"]:
        changed.append(f"--epochs {saved['epochs']} or more (not {cfg.epochs})")
    if "batch_size" in saved:
        before = TrainConfig(**{k: saved[k] for k in ("batch_size", "per_worker_batch_size", "num_workers") if k in saved})
        if before.global_batch_size != cfg.global_batch_size:
            changed.append(f"a global batch of {before.global_batch_size} (not {cfg.global_batch_size})")
    if changed:
        raise UserError(f"--resume: {where} was trained with {', '.join(changed)}; a resumed run keeps its recipe: "
                        f"pass the same values, or start a new --name")


def load_data(cfg: TrainConfig) -> Cifar10:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_cifar10(cfg.data_dir, cfg.val_size, cfg.max_train_samples, cfg.seed, cfg.download,
                            cfg.max_test_samples)
    for w in caught:
        print(f"warning: {w.message}", flush=True)
    return data


def data_refs(data: Cifar10, put) -> dict:
    """The arrays as one dict; `put` is `ray.put` (shared through the object store) or the identity."""
    refs = {f"{name}_{kind}": put(np.ascontiguousarray(getattr(getattr(data, name), kind)))
            for name in ("train", "test") for kind in ("images", "labels")}
    if data.val_is_test:
        refs["val_images"], refs["val_labels"] = refs["test_images"], refs["test_labels"]
    else:
        refs["val_images"], refs["val_labels"] = (put(np.ascontiguousarray(data.val.images)),
                                                  put(np.ascontiguousarray(data.val.labels)))
    return refs


def worker_resources(cfg: TrainConfig, use_gpu: bool) -> dict:
    return {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}


def workers_text(cfg: TrainConfig) -> str:
    if cfg.min_workers:
        return f"{cfg.min_workers} to {cfg.num_workers} workers (elastic)"
    return f"{cfg.num_workers} worker{'s' if cfg.num_workers != 1 else ''}"


def check_cluster_fits(cfg: TrainConfig, use_gpu: bool, say=print) -> None:
    """Refuse up front what the cluster cannot hold: Ray Train would otherwise wait for it forever, silently.

    A fixed cluster: a one-line UserError naming what was asked and what exists. A cluster with an autoscaler
    that can grow to fit: one line saying that the run waits for nodes.
    """
    import ray

    need = worker_resources(cfg, use_gpu)
    workers = cfg.min_workers or cfg.num_workers  # an elastic run starts once its minimum fits
    asked = (f"{workers} worker(s) x {cfg.cpus_per_worker} CPU"
             + (f" + {cfg.gpus_per_worker:g} GPU" if use_gpu else ""))
    if _workers_that_fit([n["Resources"] for n in ray.nodes() if n.get("Alive")], need) >= workers:
        return
    have = ray.cluster_resources()
    exists = f"{have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU"
    try:
        from ray._private.state import state

        ceiling = state.get_max_resources_from_cluster_config()  # None without an autoscaler
    except Exception:
        ceiling = None
    if ceiling and all(ceiling.get(k, 0) >= v * workers for k, v in need.items()):
        say(f"waiting for the autoscaler: {asked} asked, the cluster has {exists} now (up to "
            f"{ceiling.get('CPU', 0):g} CPU and {ceiling.get('GPU', 0):g} GPU)")
        return
    fix = "fewer --num-workers or --cpus-per-worker" + (", or --no-gpu" if use_gpu else "")
    raise UserError(f"{asked} do not fit on this Ray cluster ({exists}"
                    + (f", at most {ceiling.get('CPU', 0):g} CPU and {ceiling.get('GPU', 0):g} GPU with autoscaling"
                       if ceiling else "") + f"): ask for {fix}, or join a bigger cluster with --address")


def _workers_that_fit(nodes: list[dict], need: dict) -> int:
    """How many workers of `need` the nodes hold, each worker on one node."""
    return sum(int(min(node.get(k, 0) / v for k, v in need.items() if v > 0) + 1e-9) for node in nodes)


def build_trainer(cfg: TrainConfig, root: str, loop_config: dict, callbacks=None):
    """The project's TorchTrainer: one place for scaling, failure and checkpoint policy."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = resolve_use_gpu(cfg)
    resources = worker_resources(cfg, use_gpu)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=(cfg.min_workers, cfg.num_workers) if cfg.min_workers else cfg.num_workers,
            use_gpu=use_gpu, resources_per_worker=resources if cfg.num_workers else None),
        run_config=RunConfig(
            name=cfg.name, storage_path=root, callbacks=callbacks,
            # Preemptions (spot reclaims, drained nodes) are retried on their own budget (Ray's default: always).
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep, checkpoint_score_attribute="val_accuracy",
                                               checkpoint_score_order="max"),
        ),
    )


def resolve_use_gpu(cfg: TrainConfig) -> bool:
    """--gpu / --no-gpu, else GPUs whenever the cluster has them (local mode decides in the loop)."""
    import ray

    if cfg.use_gpu is not None or cfg.num_workers == 0:
        return bool(cfg.use_gpu)
    return ray.cluster_resources().get("GPU", 0) >= 1


def run_training(cfg: TrainConfig, address: str | None = None, verbose: bool = False, quiet: bool = False) -> dict:
    """Train, then write results.json and curves.png into the run folder; returns the results dict."""
    return fit_run(cfg, address, verbose, quiet)[1]


def fit_run(cfg: TrainConfig, address: str | None = None, verbose: bool = False, quiet: bool = False):
    """(Ray Train's Result, the project's results dict) of one run: checks, data, the TorchTrainer, outputs."""
    cfg, root, run_path, init_state = prepare_run(cfg)
    quiet_ray_logs(verbose)
    t0 = time.time()
    data = load_data(cfg)
    local = cfg.num_workers == 0
    check_last_step_fits(len(data.train), cfg.global_batch_size, cfg.num_workers)
    if local and storage.is_remote(run_path):
        raise UserError("--num-workers 0 writes its checkpoints straight into a local folder: use a local "
                        "--storage-path, or --num-workers 1 or more for remote storage")
    gpu = local and local_device(cfg.use_gpu).type == "cuda"  # a Ray run: what the cluster has, below
    if not local:
        init_ray(address, verbose)
        gpu = resolve_use_gpu(cfg)
        check_cluster_fits(cfg, gpu)
    # The run folder (TensorBoard's first file) only once every check has passed: a refused start leaves nothing.
    printer = ProgressPrinter(cfg.epochs, stream=open(os.devnull, "w") if quiet else None,
                              tensorboard_dir=None if storage.is_remote(run_path) else run_path)
    if not quiet:
        print(f"run {cfg.name}: ResNet-{cfg.depth} v{cfg.version}, {len(data.train):,} train / {len(data.val):,} "
              f"{'test (as val)' if data.val_is_test else 'val'} / {len(data.test):,} test images from {data.source}, "
              f"{workers_text(cfg)}, batch {cfg.global_batch_size}, {precision_text(cfg.precision, gpu, cfg.compile)}, "
              f"folder {run_path}\n{cfg.recipe_text()}", flush=True)
    try:
        result = _fit(cfg, root, run_path, data, init_state, printer)
    finally:
        printer.close()
    results = summarize(cfg, result, run_path, time.time() - t0, data.val_is_test)
    if results["test_accuracy"] is None and results["best_checkpoint"] and cfg.report_test and not data.val_is_test:
        from .evaluate import test_accuracy_of  # --test-every skipped the best epoch's test: evaluate it now

        results["test_accuracy"] = test_accuracy_of(results["best_checkpoint"], cfg.data_dir)
        results["wall_seconds"] = time.time() - t0
    write_outputs(run_path, results)
    if not quiet:
        for line in summary_lines(results):
            print(line, flush=True)
        print(f"results: {run_path}/results.json, curves: {run_path}/curves.png", flush=True)
    return result, results


def _fit(cfg: TrainConfig, root: str, run_path: str, data: Cifar10, init_state, printer):
    """Ray Train's `fit()`: in this process (--num-workers 0), else on Ray's workers with the progress lines coming
    back through a queue; a Ctrl-C becomes `Interrupted`, naming the newest checkpoint."""
    import ray

    if cfg.num_workers == 0:
        os.makedirs(run_path, exist_ok=True)
        loop_config = {"config": cfg.to_dict(), "data": data_refs(data, lambda a: a), "val_is_test": data.val_is_test,
                       "local_run_dir": run_path, "progress": printer, "init_state": init_state}
        try:
            result = build_trainer(cfg, root, loop_config).fit()
        except (KeyboardInterrupt, SystemExit) as e:
            raise Interrupted(last_saved_epoch(printer.last_epoch, run_path), run_path) from e
    else:
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: a queue on a worker node would die with it (a preempted spot node), and the run too.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        loop_config = {"config": cfg.to_dict(), "data": data_refs(data, ray.put), "val_is_test": data.val_is_test,
                       "progress": queue, "run_dir": None if storage.is_remote(run_path) else run_path,
                       "preemption_check_steps": cfg.preemption_check_steps,
                       "init_state": ray.put(init_state) if init_state is not None else None}
        trainer = build_trainer(cfg, root, loop_config)
        try:
            with QueueDrain(queue, printer):
                result = trainer.fit()
        except SystemExit as e:  # Ray's SIGINT handler in fit(): the controller is aborted, the checkpoints stay
            stop_local_ray()
            raise Interrupted(last_saved_epoch(printer.last_epoch, run_path), run_path) from e
        except ray.train.TrainingFailedError as e:
            raise RuntimeError(f"training failed after {cfg.max_failures} restart(s): {e}\n"
                               f"the checkpoints so far are in {run_path}: continue with --resume") from e
    return result


def stop_local_ray(timeout: float = 30) -> None:
    """Shut Ray down and wait for the processes this driver started (a local cluster and its workers) to exit, so
    that no worker is still writing a checkpoint when the driver says which epoch it stopped after."""
    import psutil
    import ray

    ours = psutil.Process().children(recursive=True)
    ray.shutdown()
    psutil.wait_procs(ours, timeout=timeout)


def last_saved_epoch(printed: int | None, run_path: str) -> int | None:
    """The epoch a resume continues after: the newest complete checkpoint on local disk, which may be one epoch
    ahead of the last printed line (Ctrl-C between a checkpoint's write and its line); else the last printed epoch."""
    if "://" in run_path:
        return printed
    latest = ckpt.latest_in(run_path)
    saved = ckpt.read_meta(latest)["epoch"] if latest else None
    return max((e for e in (printed, saved) if e), default=None)


class Interrupted(Exception):
    """Ctrl-C during a run: `train` prints where it stopped and the command that continues it."""

    def __init__(self, last_epoch: int | None, run_path: str):
        super().__init__(last_epoch, run_path)
        self.last_epoch, self.run_path = last_epoch, run_path


def best_checkpoint(result, run_path: str) -> tuple[str | None, dict | None]:
    """(path, metrics) of the checkpoint with the highest val accuracy (the latest on ties).

    On local storage every complete checkpoint folder counts, including one written just before an interruption
    that Ray had not registered yet; on remote storage, Ray's record.
    """
    if "://" not in run_path:
        best = ckpt.best_in(run_path)
        return (str(best), ckpt.read_meta(best)["metrics"]) if best else (None, None)
    if not result.best_checkpoints:
        return None, None
    scored = [cm for cm in result.best_checkpoints if math.isfinite(cm[1].get("val_accuracy", math.nan))]
    if not scored:  # only preemption checkpoints (mid-epoch, no val accuracy)
        return None, None
    best, metrics = max(scored, key=lambda cm: ckpt.selection_key(cm[1]))
    return storage.as_uri(best.path, run_path), metrics


def summarize(cfg: TrainConfig, result, run_path: str, wall_seconds: float, val_is_test: bool) -> dict:
    ret = result.return_value or {}
    history = ret.get("history", [])
    path, best = best_checkpoint(result, run_path)
    train_seconds = sum(h["train_seconds"] for h in history)

    return {
        "test_accuracy": best["test_accuracy"] if best else None,
        "final_test_accuracy": history[-1]["test_accuracy"] if history else None,
        "best_val_accuracy": best["val_accuracy"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "epochs": len(history),
        "num_workers": cfg.num_workers,
        "device": ret.get("device", "unknown"),
        "wall_seconds": wall_seconds,
        "train_images_per_second": (sum(h["images_per_second"] * h["train_seconds"] for h in history) / train_seconds
                                    if train_seconds else None),
        "parameters": ret.get("parameters"),
        "config": cfg.to_dict(),
        "best_checkpoint": path,
        "restarts": ret.get("restarts", []),
        "worker_nodes": ret.get("worker_nodes", []),
        "stopped": ret.get("stopped"),
        "val_is_test": val_is_test,
        "lr_cuts": [h["epoch"] for h in history if h.get("lr_cut")],
        "run_path": run_path,
        "history": history,
    }


def write_outputs(run_path: str, results: dict) -> None:
    storage.write_file(run_path, "results.json", json.dumps(results, indent=1).encode())
    if results["history"]:
        storage.write_file(run_path, "curves.png", curves_png(results["history"]))
