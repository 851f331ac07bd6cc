"""`python -m distributed_resnet.tune --config tune_configs/<file>.yaml`: a Ray Tune sweep of the recipe.

Progress: one line per trial as it ends (finished, stopped by ASHA, or error); Tune's own tables stay off unless
--verbose. At the end: the table of trials (the default recipe's marked `*`), the winner's test accuracy
(evaluated once, after selection) and how it compares with the default; best.json and trials.json in the
sweep's folder.
"""

from __future__ import annotations

import time

from ..cli import Parser, main_guard
from ..errors import UserError
from ..data import default_data_dir, find_source
from ..preflight import guard_folder, storage_root
from .schema import scheduler_spec, search_alg_spec
from .spec import (FAST_DEV_TRIALS, OVERRIDABLE, check_layout, confirm_epochs, default_notes, fast_dev_run,
                   load_sweep, planned_trials, refuse_new_layout_on_resume)


def confirm_text(spec: dict) -> str:
    c = spec.get("confirm")
    if not c:
        return ""
    return (f"; then the top {c.get('top_k', 2)} and the default recipe, {c.get('seeds', 2)} fresh seeds each at "
            f"{confirm_epochs(spec)} epochs")


def main(argv=None) -> int:
    p = Parser(prog="python -m distributed_resnet.tune", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="sweep YAML (see tune_configs/)")
    p.add_argument("--data-dir", default=None, help="overrides fixed.data_dir (default: the YAML's, else $CIFAR10_DIR)")
    p.add_argument("--storage-path", default="~/ray_results", help="local folder or s3:// URI (default %(default)s)")
    p.add_argument("--name", default=None, help="sweep folder (default: the YAML's name, else tune_<time>)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="trials, the default-recipe trial included (default: the YAML's)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are kept")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: start a local one)")
    p.add_argument("--verbose", action="store_true", help="show Tune's and Ray's own progress output")
    p.add_argument("--fast-dev-run", action="store_true",
                   help="check the whole sweep in a few minutes: at most 2 trials of 1 epoch on 128 images, a "
                        "confirmation of 1 seed x 1 epoch; the numbers mean nothing")
    g = p.add_argument_group("resources", "each replaces the YAML's value; the search stays the file's")
    g.add_argument("--num-workers", type=int, default=None, metavar="N", help="Train workers per trial (resources.num_workers)")
    g.add_argument("--cpus-per-worker", type=int, default=None, metavar="C", help="(resources.cpus_per_worker)")
    g.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="a fraction shares a GPU between trials, e.g. 0.125 with --max-concurrent-trials 6 "
                        "(resources.gpus_per_worker)")
    g.add_argument("--max-concurrent-trials", type=int, default=None, metavar="T", help="trials at once (max_concurrent_trials)")
    args = p.parse_args(argv)
    overrides = {k: getattr(args, k) for k in OVERRIDABLE}
    refuse_new_layout_on_resume(overrides, args.resume)
    spec = load_sweep(args.config, overrides)
    if args.fast_dev_run:
        spec = fast_dev_run(spec, args.config)
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples must be a positive integer, got {args.num_samples}")
    if args.fast_dev_run and args.num_samples:
        args.num_samples = min(args.num_samples, FAST_DEV_TRIALS)
    data_dir = args.data_dir or (None if (spec.get("fixed") or {}).get("data_dir") else default_data_dir())
    name = args.name or spec.get("name") or f"tune_{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"sweep {name}: {planned_trials(spec, args.num_samples)} trials ({search_alg_spec(spec)['type']} search, "
          f"{scheduler_spec(spec)['type']} scheduler; the first runs the default recipe) from {args.config}"
          + confirm_text(spec), flush=True)
    for note in default_notes(spec):
        print(f"note: {note}", flush=True)
    # The layout, the sweep folder and the data, before the slow imports of torch and Ray (seconds).
    root = storage_root(args.storage_path)
    check_layout(spec, root, args.num_samples)
    guard_folder(root, name, args.resume, "sweep")
    fixed = spec.get("fixed") or {}
    if not fixed.get("download"):
        find_source(data_dir or fixed["data_dir"])
    from .summary import print_outcome, print_table, write_summary
    from .tuner import run_sweep

    _, summary = run_sweep(spec, data_dir, args.storage_path, name, args.num_samples, args.resume, args.address,
                           args.verbose)
    if summary.get("best") is None:
        print_table(summary)
        print("no trial produced a checkpoint", flush=True)
        return 1
    write_summary(summary)
    print_outcome(summary)
    return 0


if __name__ == "__main__":
    main_guard(main)
