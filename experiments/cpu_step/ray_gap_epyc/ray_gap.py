"""Where the Ray path's small (16 px) and full-size steps lose to the in-process step: the same short run under
variants of the local Ray cluster, each in a fresh process, interleaved."""
import json, logging, os, subprocess, sys, tempfile, time
VARIANTS = {"default": {}, "nodash": {"include_dashboard": False}, "niceness0": {"env": {"RAY_worker_niceness": "0"}}}
if len(sys.argv) == 1:
    for name in ["default", "nodash", "niceness0", "default", "nodash", "niceness0"]:
        env = {**os.environ, **VARIANTS[name].get("env", {})}
        t = time.time()
        r = subprocess.run([sys.executable, __file__, name], env=env, capture_output=True, text=True)
        print(name, f"{time.time() - t:.0f}s", r.stdout.strip().splitlines()[-1:] if r.stdout.strip() else "",
              r.stderr[-500:] if r.returncode else "", flush=True)
    sys.exit()
import ray
from distributed_resnet.config import TrainConfig
from distributed_resnet.driver import run_training
name = sys.argv[1]
kw = {k: v for k, v in VARIANTS[name].items() if k != "env"}
ray.init(log_to_driver=False, logging_level=logging.ERROR, runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}}, **kw)
with tempfile.TemporaryDirectory() as tmp:
    cfg = TrainConfig(recipe="fast", num_workers=1, cpus_per_worker=2, epochs=4, data_dir=os.environ.get("CIFAR10_DIR", "../shared/cifar10"),
                      max_train_samples=12800, storage_path=tmp, name="b", use_gpu=False, val_size=500,
                      progressive_resize="16:2", test_every=4, max_test_samples=500)
    res = run_training(cfg, quiet=True)
    print(name, [round(h["images_per_second"]) for h in res["history"]], [h.get("train_size") for h in res["history"]])
