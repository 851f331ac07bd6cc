"""`python -m distributed_resnet.tune --config tune_configs/<file>.yaml`: the sweep's command line (`sweeps.cli`)."""

from .cli import main_guard
from .sweeps.cli import main

def console() -> None:
    """The `distributed-resnet-tune` console script (the same as `python -m distributed_resnet.tune`)."""
    main_guard(main)


if __name__ == "__main__":
    console()
