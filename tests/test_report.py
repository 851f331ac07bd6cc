"""What the driver shows and leaves: the epoch line and TensorBoard scalars, complete as soon as a run ends."""

import io

from distributed_resnet.report import ProgressPrinter
from tensorboard_reader import scalars


def _epoch(e: int) -> dict:
    return {"epoch": e, "lr": 1e-3, "train_loss": 1.0 / e, "train_accuracy": 0.5, "val_loss": 1.1, "val_accuracy": 0.1 * e,
            "test_loss": None, "test_accuracy": None, "images_per_second": 1000.0, "epoch_seconds": 2.0}


def test_every_epoch_is_in_tensorboard_when_the_printer_closes(tmp_path):
    """tensorboardX writes events from a thread of its own every flush_secs (10 s here): what the last epochs queued
    must still reach the file when the run ends, at once."""
    out = io.StringIO()
    printer = ProgressPrinter(3, stream=out, tensorboard_dir=str(tmp_path))
    for e in (1, 2, 3):
        printer.put(_epoch(e))
    printer.close()
    tb = scalars(tmp_path)
    assert [(e, round(v, 6)) for e, v in tb["accuracy/val"]] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert [e for e, _ in tb["loss/train"]] == [1, 2, 3] and "loss/test" not in tb  # no test metric: no scalar
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("epoch 3/3  lr 1.00e-03  loss 0.3333") and "ETA 0s" in lines[-1]
