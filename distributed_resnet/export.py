"""`python -m distributed_resnet.export --run RUN --output results/NAME`: publish a finished run.

Copies what a reader of the repo needs and nothing else: `results.json` and `curves.png`, the best-val
checkpoint's weights only (about 1.1 MB, no optimizer state) with its `meta.json`, and the evaluation of those
weights on the test set (`eval.json`, `eval_confusion.png`). The folder then works as a checkpoint itself:
`evaluate --checkpoint results/NAME`, `train --init-weights results/NAME`, `load_pretrained("results/NAME")`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .cli import Parser, main_guard
from .errors import UserError
from .data import default_data_dir


def export_run(run: str, output: str, data_dir: str) -> dict:
    from . import checkpoint as ckpt
    from .evaluate import evaluate_checkpoint, write_evaluation

    run_dir, out = Path(run).expanduser(), Path(output)
    results_file = run_dir / "results.json"
    if not results_file.is_file():
        raise UserError(f"{run_dir} has no results.json: export a run that has finished (or continue it with --resume)")
    results = json.loads(results_file.read_text())
    best = results.get("best_checkpoint")
    if not best or not Path(best).is_dir():
        raise UserError(f"the best checkpoint of {run_dir} ({best}) is missing")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; remove it or choose another --output")
    state = ckpt.load(best)
    ckpt.save_weights(out, state["model"], state["meta"])
    shutil.copy(results_file, out / "results.json")
    if (run_dir / "curves.png").is_file():
        shutil.copy(run_dir / "curves.png", out / "curves.png")
    evaluation = evaluate_checkpoint(str(out), data_dir)
    write_evaluation(evaluation, out / "eval.json")
    return evaluation


def main(argv=None) -> int:
    p = Parser(prog="python -m distributed_resnet.export", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a finished run folder (<storage-path>/<name>)")
    p.add_argument("--output", required=True, help="where to publish it, e.g. results/resnet20v1")
    p.add_argument("--data-dir", default=default_data_dir(), help="CIFAR-10 for the evaluation (default: $CIFAR10_DIR)")
    args = p.parse_args(argv)
    r = export_run(args.run, args.output, args.data_dir)
    print(f"exported {args.run} to {args.output}: best-val weights (epoch {r['epoch']}), test accuracy "
          f"{100 * r['test_accuracy']:.2f}% on {r['test_images']:,} images")
    return 0


def console() -> None:
    """The `distributed-resnet-export` console script (the same as `python -m distributed_resnet.export`)."""
    main_guard(main)


if __name__ == "__main__":
    console()
