"""One place for every training knob. The defaults are the reference recipe; each says where it comes from.

The CLIs (`train`, `tune`, `bench`) and the Tune YAML files override the same fields, so a value means the
same thing everywhere, and `TrainConfig.validate()` is the single gate that turns a bad value into a one-line
`UserError` before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


class UserError(Exception):
    """A mistake in what the user asked for: the CLIs print it as one line and exit with code 2."""


@dataclass
class TrainConfig:
    # --- model (He et al. 2016, Keras `cifar10_resnet.py`) ---
    depth: int = 20  # v1: 6n+2 (20 -> 3 blocks per stage); v2: 9n+2 (bottleneck)
    version: int = 1  # 1: conv-BN-ReLU (the reference); 2: pre-activation bottleneck
    padding: str = "same"  # "same": TensorFlow's (the reference's, odd pixel after); "symmetric": PyTorch's
    weight_decay: float = 1e-4  # Keras l2(1e-4) on every conv kernel: a loss term 1e-4 * sum(w^2)
    batchnorm: str = "global"  # "global": statistics of the whole global batch across workers (the recipe, any N);
    #                            "local": each worker's own share of the batch (DDP's default)

    # --- optimisation (reference recipe) ---
    epochs: int = 200
    schedule_epochs: int = 200  # the LR steps sit at 80/200, 120/200, ... of this many epochs (200: the reference)
    batch_size: int = 128  # global batch, split across workers as evenly as it goes (43/43/42 for 3)
    per_worker_batch_size: int | None = None  # if set, the global batch is this times the workers
    lr: float = 1e-3  # Adam's initial LR; the step schedule multiplies it
    adam_eps: float = 1e-7  # Keras' Adam epsilon (K.epsilon()); PyTorch's default is 1e-8
    lr_policy: str = "keras"  # "keras": schedule overwrites plateau cuts (as the reference); "compose": they persist
    plateau_factor: float = math.sqrt(0.1)  # ReduceLROnPlateau(factor=np.sqrt(0.1))
    plateau_patience: int = 5
    plateau_min_lr: float = 0.5e-6
    plateau_cooldown: int = 0
    plateau_min_delta: float = 1e-4  # Keras' default for ReduceLROnPlateau

    # --- data ---
    data_dir: str = "./data"
    download: bool = False
    val_size: int | None = None  # None: 10% of the training images (5,000 on CIFAR-10); 0: validate on test
    max_train_samples: int | None = None  # cap the training images (after the val split), for quick runs
    augment: bool = True  # random flip + shift up to 10% (3.2 px), nearest fill: Keras' ImageDataGenerator
    shift: str = "bilinear"  # "bilinear": Keras' continuous shift; "pixel": whole pixels -3..3, no blur
    seed: int = 0  # initial weights, val split, data order and augmentation all follow from it
    init_weights: str | None = None  # start from these weights (a checkpoint, results/..., a converted Keras model)

    # --- Ray ---
    num_workers: int = 1  # 0 runs the loop in the driver process (Ray Train local mode); the maximum if elastic
    min_workers: int | None = None  # elastic (--num-workers MIN:MAX): train on MIN..MAX workers as nodes come and go
    preemption_check_steps: int = 20  # ask Ray Train for a preemption notice every this many steps (0: never)
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: int = 1
    gpus_per_worker: float = 1.0  # with use_gpu; a fraction lets several Tune trials share one GPU
    max_failures: int = 2  # worker-group restarts, each resuming from the latest checkpoint
    storage_path: str = "~/ray_results"  # Ray's convention; an s3:// URI on a cluster
    name: str | None = None  # run folder under storage_path; default resnet{depth}v{version}_{time}
    resume: bool = False
    num_to_keep: int = 2  # checkpoints kept: the best by val accuracy, plus always the latest

    # --- speed (each on by default where it helps: see the README's speed section) ---
    precision: str = "auto"  # "bf16": autocast + channels_last + fused Adam; "auto": bf16 on CUDA and on CPUs
    #                          with native bf16 (AMX / AVX512-BF16), else fp32; "fp32": plain eager steps;
    #                          "fp64": for verification (N workers compute exactly what one does)
    eval_batch_size: int = 1000
    report_test: bool = True  # test accuracy every epoch; Tune trials turn it off (test is for the final pick only)

    @property
    def global_batch_size(self) -> int:
        if self.per_worker_batch_size:
            return self.per_worker_batch_size * max(1, self.num_workers)
        return self.batch_size

    def validate(self) -> "TrainConfig":
        """Reject any value the run could not honour, with the fix in the message."""
        if self.version not in (1, 2):
            raise UserError(f"--version must be 1 or 2, got {self.version}")
        step = 6 if self.version == 1 else 9
        if self.depth < step + 2 or (self.depth - 2) % step:
            near = max(step + 2, (self.depth - 2) // step * step + 2)
            raise UserError(
                f"--depth {self.depth} is not {step}n+2 for ResNet v{self.version}; try {near} or {near + step}"
            )
        _positive(epochs=self.epochs, batch_size=self.batch_size, eval_batch_size=self.eval_batch_size,
                  cpus_per_worker=self.cpus_per_worker, num_to_keep=self.num_to_keep)
        _positive_float(lr=self.lr, adam_eps=self.adam_eps, plateau_min_lr=self.plateau_min_lr)
        if not 0 < self.gpus_per_worker <= 8 and self.use_gpu:
            raise UserError(f"--gpus-per-worker must be in (0, 8], got {self.gpus_per_worker}")
        if self.use_gpu and self.num_workers > 1 and self.gpus_per_worker < 1:
            raise UserError(f"{self.num_workers} workers on {self.gpus_per_worker} GPU each would share one GPU, which "
                            f"NCCL refuses; give each worker a whole GPU or use 1 worker per trial")
        for key, allowed in (("padding", ("same", "symmetric")), ("shift", ("bilinear", "pixel")),
                             ("batchnorm", ("global", "local")),
                             ("precision", ("auto", "bf16", "fp32", "fp64"))):
            if getattr(self, key) not in allowed:
                raise UserError(f"--{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        _positive(schedule_epochs=self.schedule_epochs)
        if self.plateau_min_lr >= self.lr:
            raise UserError(f"--plateau-min-lr {self.plateau_min_lr:g} must be below --lr {self.lr:g}")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.per_worker_batch_size is not None:
            _positive(per_worker_batch_size=self.per_worker_batch_size)
        if self.lr_policy not in ("keras", "compose"):
            raise UserError(f"--lr-policy must be 'keras' or 'compose', got {self.lr_policy!r}")
        if not 0 < self.plateau_factor < 1:
            raise UserError(f"--plateau-factor must be in (0, 1), got {self.plateau_factor}")
        if self.plateau_patience < 0 or self.plateau_cooldown < 0:
            raise UserError("--plateau-patience and --plateau-cooldown must be >= 0")
        if self.num_workers < 0:
            raise UserError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.min_workers is not None:
            if not 1 <= self.min_workers <= self.num_workers:
                raise UserError(f"--num-workers {self.min_workers}:{self.num_workers} needs 1 <= MIN <= MAX")
            if self.per_worker_batch_size is not None:
                raise UserError("--per-worker-batch-size would change the global batch with every resize of an elastic "
                                "run: use --batch-size with --num-workers MIN:MAX")
        if self.preemption_check_steps < 0:
            raise UserError(f"--preemption-check-steps must be >= 0, got {self.preemption_check_steps}")
        if self.max_failures < -1:
            raise UserError(f"--max-failures must be >= 0 (or -1 for unlimited), got {self.max_failures}")
        if self.val_size is not None and self.val_size < 0:
            raise UserError(f"--val-size must be >= 0, got {self.val_size}")
        if self.max_train_samples is not None:
            _positive(max_train_samples=self.max_train_samples)
        if self.global_batch_size < max(1, self.num_workers):
            raise UserError(f"--batch-size {self.global_batch_size} gives fewer images than --num-workers "
                            f"{self.num_workers}: every worker needs at least one per step")
        return self

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a mapping (a YAML file, a checkpoint), naming any unknown key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown training setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**values)


def _positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise UserError(f"--{key.replace('_', '-')} must be a positive integer, got {value}")


def _positive_float(**values: float) -> None:
    for key, value in values.items():
        if not value > 0 or math.isinf(value):
            raise UserError(f"--{key.replace('_', '-')} must be a positive number, got {value}")
