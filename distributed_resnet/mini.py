"""`python -m distributed_resnet.mini --data-dir ./data --output ./data/mini`: a 2,000 / 500-image CIFAR-10 for
smoke runs and the smoke sweep, from any CIFAR-10 folder (Parquet or cifar-10-batches-py)."""

from __future__ import annotations

from .cli import Parser, main_guard
from .data import default_data_dir, make_mini


def main(argv=None) -> int:
    p = Parser(prog="python -m distributed_resnet.mini", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=default_data_dir(), help="the full CIFAR-10 (default: $CIFAR10_DIR, else ./data)")
    p.add_argument("--output", required=True, help="where to write train-/test-00000-of-00001.parquet")
    args = p.parse_args(argv)
    train, test = make_mini(args.data_dir, args.output)
    print(f"wrote {train:,} train and {test:,} test images (the first 200 / 50 of each class) to {args.output}")
    return 0


def console() -> None:
    """The `distributed-resnet-mini` console script."""
    main_guard(main)


if __name__ == "__main__":
    console()
