"""`python -m distributed_resnet.evaluate --checkpoint PATH`: test and per-class accuracy of a saved model.

Rebuilds the model the checkpoint describes, predicts the whole test set in eval mode (the same `predict`
the training loop uses), prints overall and per-class accuracy, and writes them as JSON (`--output`) with
a confusion-matrix PNG beside it. `--tta flip` also reports the accuracy of the softmax averaged over each image
and its mirror image, beside the plain number (which stays the headline and the per-class figures).
"""

from __future__ import annotations

import json
from pathlib import Path

from .cli import Parser, main_guard
from .config import EVAL_BATCH
from .errors import UserError
from .data import CLASSES, default_data_dir


def load_model(checkpoint: str, device="cpu"):
    """(model in eval mode, meta) from any checkpoint: a training checkpoint, a weights-only one, a converted
    Keras model. `distributed_resnet.load_pretrained("results/resnet20v1")` is this, in one line."""
    from . import checkpoint as ckpt

    state = ckpt.load(checkpoint)  # a missing or unsafe file is refused before the model's imports
    import torch

    from .model import ResNet

    meta = state["meta"]
    model = ResNet(meta["depth"], meta["version"], padding=ckpt.padding_of(meta))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(f"{checkpoint} does not fit ResNet-{meta['depth']} v{meta['version']}: {str(e).splitlines()[0]}")
    return model.to(torch.device(device)).eval(), meta


def evaluate_checkpoint(checkpoint: str, data_dir: str, batch: int = EVAL_BATCH, device: str | None = None,
                        tta: str | None = None) -> dict:
    import numpy as np
    import torch

    from .data import load_arrays
    from .inference import images_to_tensor, predict

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_model(checkpoint, dev)
    _, test, source = load_arrays(data_dir)
    images = images_to_tensor(test.images, dev, channels_last=False)
    logits = predict(model, images, batch)
    pred = logits.argmax(1).cpu().numpy()
    labels = np.asarray(test.labels)
    extra = {}
    if tta == "flip":
        probs = logits.softmax(1) + predict(model, images.flip(3), batch).softmax(1)
        extra["test_accuracy_tta_flip"] = float((probs.argmax(1).cpu().numpy() == labels).mean())
    matrix = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
    np.add.at(matrix, (labels, pred), 1)
    per_class = matrix.diagonal() / matrix.sum(1)
    return {
        "checkpoint": str(checkpoint), "data": source, "epoch": meta.get("epoch"), "depth": meta["depth"],
        "version": meta["version"], "test_images": int(len(labels)),
        "test_accuracy": float((pred == labels).mean()),
        "per_class_accuracy": {c: float(a) for c, a in zip(CLASSES, per_class)},
        "confusion_matrix": matrix.tolist(),
        "reported_test_accuracy": (meta.get("metrics") or {}).get("test_accuracy"),
        **extra,
    }


def test_accuracy_of(checkpoint: str, data_dir: str) -> float | None:
    """A run's checkpoint (local path or URI, as Ray reports it) evaluated on test; None, with a one-line warning,
    where the checkpoint is gone (a copied or pruned experiment folder), so a sweep's summary still completes."""
    import ray.train

    from .storage import has_files

    if not has_files(checkpoint):
        print(f"warning: no checkpoint at {checkpoint} any more; its test accuracy is left out", flush=True)
        return None
    with ray.train.Checkpoint(checkpoint).as_directory() as folder:
        return evaluate_checkpoint(folder, data_dir)["test_accuracy"]


def write_evaluation(r: dict, out: Path) -> Path:
    """The evaluation as JSON at `out`, and its confusion matrix as `<stem>_confusion.png` beside it."""
    import numpy as np

    from .report import confusion_png

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1))
    png = out.with_name(out.stem + "_confusion.png")
    png.write_bytes(confusion_png(np.array(r["confusion_matrix"]), CLASSES,
                                  f"test accuracy {100 * r['test_accuracy']:.2f}% (epoch {r['epoch']})"))
    return png


def main(argv=None) -> int:
    p = Parser(prog="python -m distributed_resnet.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint_epoch_NNNN folder (or its checkpoint.pt)")
    p.add_argument("--data-dir", default=default_data_dir(), help="CIFAR-10 (default: $CIFAR10_DIR, else ./data)")
    p.add_argument("--output", default=None, help="write the results as JSON here (confusion PNG beside it)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--tta", choices=("flip",), default=None,
                   help="flip: also report test accuracy averaged over each image and its mirror image")
    args = p.parse_args(argv)
    r = evaluate_checkpoint(args.checkpoint, args.data_dir, device=args.device, tta=args.tta)
    print(f"checkpoint {r['checkpoint']} (ResNet-{r['depth']} v{r['version']}, epoch {r['epoch']}) on "
          f"{r['test_images']:,} test images from {r['data']}")
    print(f"test accuracy {100 * r['test_accuracy']:.2f}%"
          + (f" (with flip TTA: {100 * r['test_accuracy_tta_flip']:.2f}%)" if "test_accuracy_tta_flip" in r else ""))
    for c, a in r["per_class_accuracy"].items():
        print(f"  {c:<11} {100 * a:6.2f}%")
    if args.output:
        png = write_evaluation(r, Path(args.output))
        print(f"wrote {args.output} and {png}")
    return 0


def console() -> None:
    """The `distributed-resnet-evaluate` console script (the same as `python -m distributed_resnet.evaluate`)."""
    main_guard(main)


if __name__ == "__main__":
    console()
