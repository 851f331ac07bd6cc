"""The configs Tune's searcher gives the trials of a sweep file, without training anything.

Rebuilds the sweep's searcher exactly as `python -m distributed_resnet.tune` does (`sweeps.space.searcher`: the
default point first, then BasicVariantGenerator's draws from `search_alg.seed`) and prints each trial's sampled
values in trial order. Written to recover the sixth trial of `tune_configs/fast_sweep.yaml`, whose experiment
folder was lost with a machine: trials 0-4 match what the sweep printed (docs/sweeps.md).

    python experiments/fast_recipe/sweep_configs/trial_configs.py tune_configs/fast_sweep.yaml
"""

import sys

from ray.tune.experiment import Experiment

from distributed_resnet.sweeps.space import searcher
from distributed_resnet.sweeps.spec import default_point, load_sweep

spec = load_sweep(sys.argv[1])  # read and checked as `tune` reads it
spec.pop("max_concurrent_trials", None)  # the searcher would hand out one trial until the first one ends
generator, space, _ = searcher(spec, default_point(spec), verbose=False)
generator.add_configurations([Experiment("configs", run=lambda config: None, config=space,
                                         num_samples=spec["num_samples"])])
for index in range(spec["num_samples"]):
    trial = generator.next_trial()
    print(index, {key: trial.config[key] for key in space})
