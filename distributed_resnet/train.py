"""`python -m distributed_resnet.train`: train ResNet on CIFAR-10 with Ray Train (see --help)."""

from __future__ import annotations

import shlex
import sys

from .cli import Parser, add_train_args, config_from_args, main_guard
from .preflight import check_before_start


def main(argv=None) -> int:
    p = Parser(prog="python -m distributed_resnet.train",
               description="Train ResNet-20 (or any 6n+2 / 9n+2 depth) on CIFAR-10 with the Keras reference recipe, "
                           "data-parallel over Ray Train workers.")
    add_train_args(p)
    p.add_argument("--address", default=None, help="join this Ray cluster (default: start a local one)")
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    args = p.parse_args(argv)
    cfg = config_from_args(args).validate()
    check_before_start(cfg)  # before the slow imports of torch and Ray (seconds)
    from .api import fit
    from .driver import Interrupted

    try:
        results = fit(cfg, address=args.address, verbose=args.verbose, quiet=False).summary
    except Interrupted as e:
        argv = list(sys.argv[1:] if argv is None else argv)
        if cfg.name and "--name" not in argv:
            argv += ["--name", cfg.name]
        command = shlex.join(["python", "-m", "distributed_resnet.train", *argv, *(["--resume"] if not cfg.resume else [])])
        done = f"after epoch {e.last_epoch}" if e.last_epoch else "before this session finished an epoch"
        print(f"\ninterrupted {done}; checkpoints are in {e.run_path}; continue with: {command}", file=sys.stderr, flush=True)
        return 130
    return 1 if results["stopped"] or results["best_checkpoint"] is None else 0


def console() -> None:
    """The `distributed-resnet-train` console script (the same as `python -m distributed_resnet.train`)."""
    main_guard(main)


if __name__ == "__main__":
    console()
