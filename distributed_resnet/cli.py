"""Shared command-line plumbing: the training flags (one per TrainConfig field) and one-line user errors."""

from __future__ import annotations

import argparse
import sys
import warnings

from .config import TrainConfig
from .errors import UserError
from .data import default_data_dir


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line on stderr (exit 2), not usage + error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main_guard(main) -> None:
    """Run `main()`; a UserError becomes `error: ...` on stderr and exit code 2, with no traceback."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: checkpoints written so far are kept; continue with --resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def _preset(key: str, fmt: str = "{}") -> str:
    """'keras: X, fast: Y' for a field the recipes set."""
    from .recipes import RECIPES

    return ", ".join(f"{name}: {fmt.format(values[key])}" for name, values in RECIPES.items())


def add_train_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field. A flag the recipe sets defaults to None (the recipe's value); its help
    shows both recipes' values."""
    d = TrainConfig()
    g = p.add_argument_group("recipe")
    g.add_argument("--recipe", choices=("keras", "fast"), default=d.recipe,
                   help="keras (default): the Keras reference, Adam, 200 epochs, step schedule + ReduceLROnPlateau; "
                        "fast: one-cycle SGD-Nesterov in 30 epochs. Sets the defaults marked 'keras: .., fast: ..'; "
                        "any flag given explicitly wins")
    g.add_argument("--epochs", type=int, default=None, help=f"({_preset('epochs')})")
    g.add_argument("--schedule-epochs", type=int, default=None, metavar="N",
                   help="the LR policy spans N epochs: keras puts its LR steps at 80/200, 120/200, 160/200, 180/200 "
                        "of N (default 200, the reference); onecycle decays to --final-lr at the end of N "
                        "(default: --epochs)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch, split over workers (default %(default)s)")
    g.add_argument("--per-worker-batch-size", type=int, default=None,
                   help="keep this batch per worker instead; the global batch grows with the workers")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default=None,
                   help=f"adam: Keras' Adam (eps 1e-7); sgd: momentum, Nesterov unless --no-nesterov ({_preset('optimizer')})")
    g.add_argument("--lr", type=float, default=None, help=f"Adam's initial LR, or the one cycle's peak ({_preset('lr', '{:g}')})")
    g.add_argument("--adam-eps", type=float, default=d.adam_eps, help="Adam (default %(default)g, Keras')")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD (default %(default)s)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=d.nesterov, help="SGD (default on)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help=f"L2 coefficient c of the loss term c*sum(w^2), Keras' l2(c); the optimizer's weight_decay "
                        f"is 2c ({_preset('weight_decay', '{:g}')})")
    g.add_argument("--weight-decay-on", choices=("conv", "weights"), default=None,
                   help=f"conv: conv kernels only (the reference); weights: conv and dense weights; never "
                        f"BatchNorm or biases ({_preset('weight_decay_on')})")
    g.add_argument("--label-smoothing", type=float, default=None, help=f"({_preset('label_smoothing', '{:g}')})")
    g.add_argument("--lr-policy", choices=("keras", "compose", "onecycle"), default=None,
                   help="keras: the step schedule overrides plateau cuts, as the reference; compose: cuts persist; "
                        f"onecycle: set per step, warm-up then decay ({_preset('lr_policy')})")
    g.add_argument("--plateau-factor", type=float, default=d.plateau_factor, help="(default sqrt(0.1))")
    g.add_argument("--plateau-patience", type=int, default=d.plateau_patience, help="epochs (default %(default)s)")
    g.add_argument("--plateau-min-lr", type=float, default=d.plateau_min_lr, help="(default %(default)g)")
    g.add_argument("--plateau-min-delta", type=float, default=d.plateau_min_delta,
                   help="least gain that counts as progress (default %(default)g, Keras')")
    g.add_argument("--plateau-cooldown", type=int, default=d.plateau_cooldown, help="epochs (default %(default)s)")
    g.add_argument("--plateau-patience-fraction", type=float, default=None, metavar="F",
                   help="patience as a fraction of --schedule-epochs, so it scales with the run (the reference's 5 "
                        "of 200 is 0.025); instead of --plateau-patience")
    g.add_argument("--plateau-cooldown-fraction", type=float, default=None, metavar="F",
                   help="cooldown as a fraction of --schedule-epochs; instead of --plateau-cooldown")
    g.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction,
                   help="onecycle: the share of steps warming up (default %(default)s)")
    g.add_argument("--warmup-start-factor", type=float, default=d.warmup_start_factor,
                   help="onecycle: the first LR as a fraction of the peak (default %(default)s)")
    g.add_argument("--anneal", choices=("linear", "cosine"), default=d.anneal,
                   help="onecycle: the decay after the warm-up (default %(default)s)")
    g.add_argument("--final-lr", type=float, default=d.final_lr, help="onecycle: the LR at the last step (default 0)")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="turn off flip + shift augmentation")
    g.add_argument("--shift", choices=("bilinear", "pixel"), default=None,
                   help=f"bilinear: Keras' continuous shift; pixel: whole pixels, no interpolation ({_preset('shift')})")
    g.add_argument("--max-shift", type=float, default=None, metavar="FRACTION",
                   help=f"the largest shift per axis as a fraction of the side, 0.125 = 4 px ({_preset('max_shift', '{:g}')})")
    g.add_argument("--flip", choices=("random", "alternate"), default=None,
                   help=f"random: mirror each image with probability 1/2 every epoch; alternate: a coin per image in the "
                        f"first epoch, then mirrored every other epoch ({_preset('flip')})")
    g.add_argument("--progressive-resize", default=None, metavar="SIZE:EPOCHS,...",
                   help="cheaper early epochs: 16:10,24:10 trains at 16 px for 10 epochs, at 24 px for the next 10, then "
                        "at full size; validation and test stay at full size (default: full size throughout)")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=d.depth, help="6n+2 for v1, 9n+2 for v2 (default %(default)s)")
    g.add_argument("--version", type=int, default=d.version, choices=(1, 2), help="ResNet v1 or v2 (default %(default)s)")
    g.add_argument("--padding", choices=("same", "symmetric"), default=None,
                   help=f"same: TensorFlow's, as the reference; symmetric: PyTorch's ({_preset('padding')})")
    g.add_argument("--bn-momentum", type=float, default=None,
                   help=f"BatchNorm running-statistics momentum, PyTorch's convention ({_preset('bn_momentum', '{:g}')})")
    g.add_argument("--batchnorm", choices=("global", "local"), default=d.batchnorm,
                   help="global (default): BatchNorm statistics of the whole global batch across workers, so N "
                        "workers train what one does; local: each worker's share only (DDP's default)")
    g.add_argument("--init-weights", default=None, metavar="CKPT",
                   help="start from these weights (a checkpoint, results/resnet20v1, a converted Keras model); "
                        "optimizer and LR schedule start fresh")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=default_data_dir(),
                   help="CIFAR-10 as Parquet or cifar-10-batches-py (default: $CIFAR10_DIR, else ./data)")
    g.add_argument("--download", action="store_true", help="fetch CIFAR-10 with torchvision if --data-dir has none")
    g.add_argument("--val-size", type=int, default=None,
                   help="training images held out for validation (default 10%%: 5000); 0 validates on test")
    g.add_argument("--max-train-samples", type=int, default=None, metavar="K", help="train on K images only")
    g.add_argument("--max-test-samples", type=int, default=None, metavar="K",
                   help="evaluate on the first K test images only (a quick check, not a result)")
    g = p.add_argument_group("Ray")
    g.add_argument("--num-workers", type=workers_arg, default=d.num_workers, metavar="N|MIN:MAX",
                   help="Ray Train workers; MIN:MAX (torchrun's notation) trains elastically on MIN to MAX workers, "
                        "shrinking on a preemption and growing as nodes join; 0 runs in this process (default "
                        "%(default)s)")
    g.add_argument("--preemption-check-steps", type=int, default=d.preemption_check_steps, metavar="K",
                   help="every K steps, ask Ray Train for a preemption notice (a spot reclaim, a drained node) and "
                        "checkpoint mid-epoch on one (default %(default)s; 0: never)")
    g.add_argument("--gpu", dest="use_gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="GPUs for the workers, --gpus-per-worker each (default: when the cluster has GPUs)")
    g.add_argument("--cpus-per-worker", type=int, default=d.cpus_per_worker)
    g.add_argument("--gpus-per-worker", type=float, default=d.gpus_per_worker,
                   help="GPUs per worker when the run uses GPUs; a fraction (1 worker only) lets several runs share one "
                        "GPU, as Ray's resources_per_worker (default %(default)g)")
    g.add_argument("--max-failures", type=int, default=d.max_failures, help="worker restarts (default %(default)s)")
    g.add_argument("--storage-path", default=d.storage_path, help="local folder or s3:// URI (default %(default)s)")
    g.add_argument("--name", default=None, help="run folder name (default resnet<depth>v<version>_<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --storage-path/--name")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help="evaluation batch; does not change the numbers (default %(default)s)")
    g.add_argument("--test-every", type=int, default=d.test_every, metavar="K",
                   help="evaluate test every K epochs and at the last; the best checkpoint gets its test accuracy at "
                        "the end if its epoch had none (default %(default)s: every epoch)")
    g.add_argument("--num-to-keep", type=int, default=d.num_to_keep, help="checkpoints kept (default %(default)s)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32", "fp64"), default=d.precision,
                   help="bf16: autocast + channels_last + fused Adam; auto (default): bf16 on GPUs (compute "
                        "capability 8.0+) and on CPUs with native bf16 (AMX/AVX512-BF16), else fp32; fp64: for "
                        "verification runs (N workers against one without fp32's rounding)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the training step (Inductor; measured 0.9-1.3x the eager step on 2-core CPUs with "
                        "native bf16, docs/speed.md); a compile failure falls back to eager with a warning (default off)")
    g.add_argument("--cuda-graph", choices=("auto", "on", "off"), default=d.cuda_graph,
                   help="on: the graph-safe training step (static buffers, the LR on the device), captured as one "
                        "CUDA graph on a GPU, run eagerly on a CPU, one worker only; auto: on for a single CUDA "
                        "worker; off (default until measured on a GPU): the eager step")
    g.add_argument("--deterministic", action="store_true",
                   help="fp32 numbers that do not depend on --num-workers, bit for bit: every sum over the batch "
                        "(BatchNorm statistics, weight and bias gradients, their all-reduce) is computed "
                        "independently of the split and rounded once (measured on CPUs); slower; needs --precision fp32")
    g.add_argument("--no-fast", dest="precision", action="store_const", const="fp32", help="alias of --precision fp32")
    p.add_argument("--fast-dev-run", action="store_true",
                   help="check the whole path in about a minute, as Lightning's fast_dev_run: 1 epoch on "
                        f"{FAST_DEV_RUN['max_train_samples']} training images, {FAST_DEV_RUN['val_size']} val, "
                        f"{FAST_DEV_RUN['max_test_samples']} test; "
                        "the accuracy means nothing")


def workers_arg(text: str):
    """`N` or `MIN:MAX`."""
    try:
        if ":" in text:
            low, high = (int(part) for part in text.split(":"))
            return low, high
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX, got {text!r}")


# What --fast-dev-run shrinks a run to (the rest of the command stays as given).
FAST_DEV_RUN = {"epochs": 1, "max_train_samples": 256, "val_size": 64, "max_test_samples": 256}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    if getattr(args, "fast_dev_run", False):
        values.update(FAST_DEV_RUN)
    if isinstance(values.get("num_workers"), tuple):
        values["min_workers"], values["num_workers"] = values["num_workers"]
    return TrainConfig(**values)
