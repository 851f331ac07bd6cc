"""One place for every training knob; the two recipes that preset them are in `recipes.py`.

`recipe="keras"` (the default) is the Keras reference: Adam, the 200-epoch step schedule, ReduceLROnPlateau.
`recipe="fast"` is a one-cycle SGD recipe for 30 epochs (see `recipes.RECIPES`). A field left at None takes its
recipe's value when the config is built, so an explicit value always wins over the preset, and a saved config
holds every value the run resolved to.

The CLIs (`train`, `tune`, `bench`) and the Tune YAML files override the same fields, so a value means the
same thing everywhere, and `TrainConfig.validate()` is the single gate that turns a bad value into a one-line
`UserError` before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from .errors import UserError
from .recipes import RECIPES

IMAGE_SIDE = 32  # CIFAR-10's images are 32 x 32 px

# Evaluation batch: the training batch. The logits do not depend on it (eval mode; the same bits from 64 to 1000 on
# a 2-core EPYC), its speed does: there, 10,000 test images in fp32 took 18-22 s at 1000 and 8-9 s at 128
# (experiments/eval_batch).
EVAL_BATCH = 128


def default_data_dir() -> str:
    """Where CIFAR-10 is unless a run says: $CIFAR10_DIR, else ./data."""
    return os.environ.get("CIFAR10_DIR", "./data")


@dataclass
class TrainConfig:
    recipe: str = "keras"  # "keras": the reference; "fast": one-cycle SGD in 30 epochs (recipes.RECIPES)

    # --- model (He et al. 2016, Keras `cifar10_resnet.py`) ---
    depth: int = 20  # v1: 6n+2 (20 -> 3 blocks per stage); v2: 9n+2 (bottleneck)
    version: int = 1  # 1: conv-BN-ReLU (the reference); 2: pre-activation bottleneck
    padding: str | None = None  # "same": TensorFlow's (the reference's, odd pixel after); "symmetric": PyTorch's
    bn_momentum: float | None = None  # PyTorch's convention: Keras' momentum 0.99 is 0.01
    batchnorm: str = "global"  # "global": statistics of the whole global batch across workers (the recipe, any N);
    #                            "local": each worker's own share of the batch (DDP's default)

    # --- optimisation ---
    epochs: int | None = None
    schedule_epochs: int | None = None  # the LR policy spans this many epochs (keras: steps at 80/200, ... of it)
    batch_size: int = 128  # global batch, split across workers as evenly as it goes (43/43/42 for 3)
    per_worker_batch_size: int | None = None  # if set, the global batch is this times the workers
    optimizer: str | None = None  # "adam" (Keras' Adam, coupled L2) or "sgd" (momentum, optionally Nesterov)
    lr: float | None = None  # Adam's initial LR, or the one-cycle's peak
    adam_eps: float = 1e-7  # Keras' Adam epsilon (K.epsilon()); PyTorch's default is 1e-8
    momentum: float = 0.9  # SGD only
    nesterov: bool = True  # SGD only
    weight_decay: float | None = None  # L2 coefficient c of a loss term c * sum(w^2), as Keras' l2(c); the
    #                                    optimizer's (coupled) weight_decay is 2c
    weight_decay_on: str | None = None  # "conv": conv kernels (the reference); "weights": conv and dense weights
    label_smoothing: float | None = None
    lr_policy: str | None = None  # "keras": schedule overwrites plateau cuts (as the reference); "compose": they
    #                               persist; "onecycle": per step, warm-up then decay to final_lr
    plateau_factor: float = math.sqrt(0.1)  # ReduceLROnPlateau(factor=np.sqrt(0.1))
    plateau_patience: int = 5
    plateau_min_lr: float = 0.5e-6
    plateau_cooldown: int = 0
    # The same two as fractions of schedule_epochs, so that they mean the same at any length (a sweep trial of 12
    # epochs, the 200-epoch run): patience = round(fraction * schedule_epochs), at least 1. The reference's 5
    # epochs of 200 is 0.025. Either form, not both.
    plateau_patience_fraction: float | None = None
    plateau_cooldown_fraction: float | None = None
    plateau_min_delta: float = 1e-4  # Keras' default for ReduceLROnPlateau
    warmup_fraction: float = 0.15  # onecycle: share of the steps spent warming up
    warmup_start_factor: float = 0.1  # onecycle: the first step's LR as a fraction of the peak
    anneal: str = "linear"  # onecycle: "linear" or "cosine" from the peak to final_lr at the last step
    final_lr: float = 0.0  # onecycle

    # --- data ---
    data_dir: str = field(default_factory=lambda: default_data_dir())  # $CIFAR10_DIR, as the command line
    download: bool = False
    val_size: int | None = None  # None: 10% of the training images (5,000 on CIFAR-10); 0: validate on test
    max_train_samples: int | None = None  # cap the training images (after the val split), for quick runs
    max_test_samples: int | None = None  # evaluate on the first K test images only (quick runs: --fast-dev-run)
    augment: bool = True  # random flip + shift, edge (nearest) fill: Keras' ImageDataGenerator
    shift: str | None = None  # "bilinear": Keras' continuous shift; "pixel": whole pixels, no blur
    max_shift: float | None = None  # the largest shift per axis, a fraction of the side (0.1 of 32 px: 3.2 px)
    flip: str | None = None  # "random": each image mirrored with probability 1/2 every epoch (Keras');
    #                          "alternate": a coin per image in epoch 1, then mirrored every other epoch (airbench)
    progressive_resize: str | None = None  # "16:10,24:10": train at 16 px for the first 10 epochs, at 24 px for the
    #                                       next 10, then at full size (cheaper early epochs, as fast CIFAR trainers
    #                                       do); validation and test are always at full size
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

    # --- speed (each on by default where it helps: see docs/speed.md) ---
    precision: str = "auto"  # "bf16": autocast + channels_last + fused Adam; "auto": bf16 on CUDA and on CPUs
    #                          with native bf16 (AMX / AVX512-BF16), else fp32; "fp32": plain eager steps;
    #                          "fp64": for verification (N workers compute exactly what one does)
    deterministic: bool = False  # fp32 numbers that do not depend on num_workers: every sum over the batch made
    #                              independent of the split (deterministic.py); slower; needs precision fp32 and global BN
    compile: bool = False  # torch.compile (Inductor) of the training forward + backward: 0.9-1.3x the eager step on
    #                        2-core CPUs with native bf16 (docs/speed.md), not enough to make it the default
    cuda_graph: str = "off"  # "on": the graph-safe step (graphed.py), captured as one CUDA graph on a GPU, run
    #                          eagerly on a CPU; "auto": on for a single CUDA worker; off by default until a GPU
    #                          has measured it
    eval_batch_size: int = EVAL_BATCH
    report_test: bool = True  # test accuracy every epoch; Tune trials turn it off (test is for the final pick only)
    test_every: int = 1  # test accuracy every k epochs and at the last: the 10,000 test images in fp32 are ~12% of
    #                      a CPU epoch; the best checkpoint is evaluated on test at the end when its epoch had none

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise UserError(f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        for key, value in RECIPES[self.recipe].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.schedule_epochs is None:  # the fast recipe's one cycle spans the run
            self.schedule_epochs = self.epochs

    @property
    def patience_epochs(self) -> int:
        """The plateau's patience in epochs: plateau_patience, or its fraction of schedule_epochs."""
        if self.plateau_patience_fraction is None:
            return self.plateau_patience
        return max(1, round(self.plateau_patience_fraction * self.schedule_epochs))

    @property
    def cooldown_epochs(self) -> int:
        if self.plateau_cooldown_fraction is None:
            return self.plateau_cooldown
        return round(self.plateau_cooldown_fraction * self.schedule_epochs)

    @property
    def global_batch_size(self) -> int:
        if self.per_worker_batch_size:
            return self.per_worker_batch_size * max(1, self.num_workers)
        return self.batch_size

    def train_sizes(self) -> list[tuple[int, int]]:
        """`progressive_resize` as (side in pixels, epochs) phases; [] when every epoch trains at full size."""
        if not self.progressive_resize:
            return []
        phases = []
        for part in str(self.progressive_resize).split(","):
            size, _, epochs = part.strip().partition(":")
            if not (size.isdigit() and epochs.isdigit()) or not 8 <= int(size) <= IMAGE_SIDE or int(epochs) < 1:
                raise UserError(f"--progressive-resize takes SIZE:EPOCHS[,SIZE:EPOCHS...] with sizes of 8 to "
                                f"{IMAGE_SIDE} px and at least 1 epoch each (e.g. 16:10,24:10), "
                                f"got {self.progressive_resize!r}")
            phases.append((int(size), int(epochs)))
        return phases

    def train_size(self, epoch: int) -> int | None:
        """The side the training images are resized to in `epoch` (from 0), None for full size."""
        end = 0
        for size, epochs in self.train_sizes():
            end += epochs
            if epoch < end:
                return size
        return None

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
                  cpus_per_worker=self.cpus_per_worker, num_to_keep=self.num_to_keep, test_every=self.test_every)
        _positive_float(lr=self.lr, adam_eps=self.adam_eps, plateau_min_lr=self.plateau_min_lr)
        may_use_gpus = self.use_gpu is not False  # None: GPUs wherever the cluster has them
        if may_use_gpus and not 0 < self.gpus_per_worker <= 8:
            raise UserError(f"--gpus-per-worker must be in (0, 8], got {self.gpus_per_worker}")
        if may_use_gpus and self.num_workers > 1 and self.gpus_per_worker < 1:
            raise UserError(f"{self.num_workers} workers on {self.gpus_per_worker} GPU each would share one GPU, which "
                            f"NCCL refuses; give each worker a whole GPU or use 1 worker per run")
        for key, allowed in (("padding", ("same", "symmetric")), ("shift", ("bilinear", "pixel")),
                             ("flip", ("random", "alternate")),
                             ("batchnorm", ("global", "local")), ("optimizer", ("adam", "sgd")),
                             ("weight_decay_on", ("conv", "weights")), ("anneal", ("linear", "cosine")),
                             ("lr_policy", ("keras", "compose", "onecycle")),
                             ("precision", ("auto", "bf16", "fp32", "fp64"))):
            if getattr(self, key) not in allowed:
                raise UserError(f"--{key.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        _positive(schedule_epochs=self.schedule_epochs)
        if self.plateau_min_lr >= self.lr and self.lr_policy != "onecycle":
            raise UserError(f"--plateau-min-lr {self.plateau_min_lr:g} must be below --lr {self.lr:g}")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.per_worker_batch_size is not None:
            _positive(per_worker_batch_size=self.per_worker_batch_size)
        for key, low, high in (("label_smoothing", 0, 1), ("warmup_fraction", 0, 1), ("warmup_start_factor", 0, 1),
                               ("max_shift", 0, 0.5), ("bn_momentum", 0, 1), ("momentum", 0, 1)):
            if not low <= getattr(self, key) < high:
                raise UserError(f"--{key.replace('_', '-')} must be in [{low}, {high}), got {getattr(self, key)}")
        if not 0 <= self.final_lr < self.lr:
            raise UserError(f"--final-lr {self.final_lr:g} must be >= 0 and below --lr {self.lr:g}")
        if not 0 < self.plateau_factor < 1:
            raise UserError(f"--plateau-factor must be in (0, 1), got {self.plateau_factor}")
        if self.plateau_patience < 0 or self.plateau_cooldown < 0:
            raise UserError("--plateau-patience and --plateau-cooldown must be >= 0")
        for key, low in (("plateau_patience", 0), ("plateau_cooldown", 0)):
            fraction = getattr(self, f"{key}_fraction")
            if fraction is None:
                continue
            if not (low < fraction <= 1 or (key == "plateau_cooldown" and fraction == 0)):
                raise UserError(f"--{key.replace('_', '-')}-fraction must be in {'[' if low == -1 else '('}0, 1] (of "
                                f"--schedule-epochs), got {fraction}")
            if getattr(self, key) != TrainConfig.__dataclass_fields__[key].default:
                raise UserError(f"--{key.replace('_', '-')} (epochs) and --{key.replace('_', '-')}-fraction (of "
                                f"--schedule-epochs) set the same thing: give one of them")
        if self.num_workers < 0:
            raise UserError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.min_workers is not None:
            if not 1 <= self.min_workers <= self.num_workers:
                raise UserError(f"--num-workers {self.min_workers}:{self.num_workers} needs 1 <= MIN <= MAX")
            if self.per_worker_batch_size is not None:
                raise UserError("--per-worker-batch-size would change the global batch with every resize of an elastic "
                                "run: use --batch-size with --num-workers MIN:MAX")
        if self.deterministic and self.precision not in ("fp32", "fp64"):
            raise UserError(f"--deterministic computes in fp32: add --precision fp32 (not {self.precision}; bf16 "
                            f"autocast rounds each worker's share on its own)")
        if self.deterministic and self.compile:
            raise UserError("--deterministic reproduces its numbers bit for bit, which a compiled step (fused, "
                            "reordered sums) does not promise: drop --compile")
        if self.cuda_graph not in ("auto", "on", "off"):
            raise UserError(f"--cuda-graph must be auto, on or off, got {self.cuda_graph!r}")
        if self.cuda_graph == "on" and (self.num_workers > 1 or self.min_workers is not None):
            raise UserError("--cuda-graph on captures one worker's step (a graph of DDP's all-reduce needs NCCL "
                            "and a GPU per worker; see docs/speed.md): use --num-workers 1, or --cuda-graph auto to "
                            "graph only single-worker runs")
        if self.cuda_graph == "on" and (self.deterministic or self.compile):
            raise UserError(f"--cuda-graph on replaces the eager step that --"
                            f"{'deterministic' if self.deterministic else 'compile'} changes: drop one of them")
        if self.deterministic and self.batchnorm != "global":
            raise UserError("--deterministic trains the same model on any number of workers, which per-worker "
                            "BatchNorm statistics do not: drop --batchnorm local")
        if self.preemption_check_steps < 0:
            raise UserError(f"--preemption-check-steps must be >= 0, got {self.preemption_check_steps}")
        if self.max_failures < -1:
            raise UserError(f"--max-failures must be >= 0 (or -1 for unlimited), got {self.max_failures}")
        if self.val_size is not None and self.val_size < 0:
            raise UserError(f"--val-size must be >= 0, got {self.val_size}")
        if self.max_train_samples is not None:
            _positive(max_train_samples=self.max_train_samples)
        if self.max_test_samples is not None:
            _positive(max_test_samples=self.max_test_samples)
        if sum(epochs for _, epochs in self.train_sizes()) >= self.schedule_epochs:
            raise UserError(f"--progressive-resize {self.progressive_resize} leaves none of the {self.schedule_epochs} "
                            f"epochs of the schedule at full size: the last must train at the size they are tested at")
        if self.global_batch_size < max(1, self.num_workers):
            raise UserError(f"--batch-size {self.global_batch_size} gives fewer images than --num-workers "
                            f"{self.num_workers}: every worker needs at least one per step")
        return self

    def recipe_text(self) -> str:
        """One line with the values the recipe resolved to (the run's start line; the saved config has them all)."""
        policy = {"onecycle": f"one cycle over {self.schedule_epochs} epochs (warm-up {self.warmup_fraction:g} from "
                              f"{self.warmup_start_factor:g}x, {self.anneal} to {self.final_lr:g}), per step",
                  }.get(self.lr_policy, f"{self.lr_policy} steps over {self.schedule_epochs} epochs + plateau "
                                        f"(factor {self.plateau_factor:.3g}, patience {self.patience_epochs}"
                                        + (f", cooldown {self.cooldown_epochs}" if self.cooldown_epochs else "") + ")")
        optimizer = (f"SGD (momentum {self.momentum:g}{', Nesterov' if self.nesterov else ''})"
                     if self.optimizer == "sgd" else f"Adam (eps {self.adam_eps:g})")
        shifts = (f"{self.flip} flips + {self.shift} shifts up to {self.max_shift:g} of the side" if self.augment
                  else "no augmentation")
        return (f"recipe {self.recipe}: {optimizer}, lr {self.lr:g}, {policy}; L2 {self.weight_decay:g} on "
                f"{self.weight_decay_on}; label smoothing {self.label_smoothing:g}; {shifts}; "
                f"{self.padding} padding, BatchNorm momentum {self.bn_momentum:g}; {self.epochs} epochs"
                + "".join(f", {epochs} at {size} px" for size, epochs in self.train_sizes())
                + (", then full size" if self.progressive_resize else ""))

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
