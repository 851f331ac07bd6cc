"""`python -m distributed_resnet.tune --config tune_configs/<file>.yaml`: the sweep's command line (`sweep.cli`)."""

from .cli import main_guard
from .sweep.cli import main

if __name__ == "__main__":
    main_guard(main)
