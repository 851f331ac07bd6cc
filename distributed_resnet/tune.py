"""`python -m distributed_resnet.tune --config tune_configs/<file>.yaml`: the sweep's command line (`sweeps.cli`)."""

from .cli import main_guard
from .sweeps.cli import main

if __name__ == "__main__":
    main_guard(main)
