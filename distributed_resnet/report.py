"""What the user sees: one line per epoch, a summary at the end, the curves and confusion-matrix PNGs.

Workers never print: rank 0 hands each epoch's metrics to a `ProgressPrinter` (through a Ray queue when
the loop runs in Ray workers), and the driver prints them, so Ray's own log stream can stay off.
"""

from __future__ import annotations

import io
import sys
import threading
import time

import numpy as np

from .config import IMAGE_SIDE


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# metric -> TensorBoard tag: the splits of a quantity share a chart
TENSORBOARD_TAGS = {f"{split}_{kind}": f"{kind}/{split}" for kind in ("loss", "accuracy") for split in ("train", "val", "test")}
TENSORBOARD_TAGS.update(lr="lr", images_per_second="speed/images_per_second", epoch_seconds="speed/epoch_seconds")


class ProgressPrinter:
    """Formats each epoch's metrics as one line, with an ETA from the epochs seen so far in this process, and
    writes them as TensorBoard scalars into `tensorboard_dir` (the run folder) when given."""

    def __init__(self, epochs: int, stream=None, label: str = "", tensorboard_dir: str | None = None):
        self.epochs, self.stream, self.label = epochs, stream or sys.stdout, label
        self.seconds: list[float] = []
        self.last_epoch: int | None = None  # the last finished epoch seen
        self.tensorboard = None
        if tensorboard_dir:
            from tensorboardX import SummaryWriter  # comes with ray[tune]

            self.tensorboard = SummaryWriter(tensorboard_dir, flush_secs=10)

    def put(self, m: dict) -> None:
        if "stopped" in m:
            print(f"{self.label}stopped: {m['stopped']}", file=self.stream, flush=True)
            return
        if "note" in m:
            print(f"{self.label}{m['note']}", file=self.stream, flush=True)
            return
        self.seconds.append(m["epoch_seconds"])
        self.last_epoch = m["epoch"]
        if self.tensorboard is not None:
            for key, tag in TENSORBOARD_TAGS.items():
                if m.get(key) is not None:
                    self.tensorboard.add_scalar(tag, m[key], m["epoch"])
        eta = np.mean(self.seconds[-10:]) * (self.epochs - m["epoch"])
        cut = " (plateau cut)" if m.get("lr_cut") else ""
        print(f"{self.label}epoch {m['epoch']:>{len(str(self.epochs))}}/{self.epochs}  lr {m['lr']:.2e}  "
              f"loss {m['train_loss']:.4f}  train {100 * m['train_accuracy']:5.2f}%  {_side(m)}"
              f"val {100 * m['val_accuracy']:5.2f}%  {_test(m)}"
              f"{m['images_per_second']:,.0f} img/s  {m['epoch_seconds']:.1f}s  ETA {fmt_duration(eta)}{cut}",
              file=self.stream, flush=True)

    def close(self) -> None:
        """Write out the TensorBoard events still queued: tensorboardX writes them from a thread of its own, every
        `flush_secs`, and its `flush()` does not wait for that queue, so without this the last epoch could be lost."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def _test(m: dict) -> str:
    return "" if m.get("test_accuracy") is None else f"test {100 * m['test_accuracy']:5.2f}%  "


def _side(m: dict) -> str:
    """The training images' side where `--progressive-resize` made it smaller than CIFAR-10's 32 px."""
    return "" if m.get("train_size", IMAGE_SIDE) == IMAGE_SIDE else f"at {m['train_size']} px  "


class QueueDrain:
    """A driver thread that prints what workers put on a `ray.util.queue.Queue` while `fit()` runs."""

    def __init__(self, queue, printer: ProgressPrinter):
        self.queue, self.printer = queue, printer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()
        return False

    def _run(self):
        while not self._stop.is_set():
            self._drain(block_seconds=0.5)

    def _drain(self, block_seconds: float = 0.0):
        from ray.util.queue import Empty

        try:
            items = [self.queue.get(timeout=block_seconds)] if block_seconds else []
            items += self.queue.get_nowait_batch(self.queue.qsize())
        except Empty:
            return
        except Exception:  # the queue actor is gone with the cluster at shutdown
            time.sleep(block_seconds)
            return
        for item in items:
            self.printer.put(item)


def _percent(x: float | None) -> str:
    return "not evaluated" if x is None else f"{100 * x:.2f}%"


def summary_lines(results: dict) -> list[str]:
    r = results
    lines = [f"finished {r['epochs']} epochs in {fmt_duration(r['wall_seconds'])} on {r['device']} "
             f"({r['num_workers']} worker{'s' if r['num_workers'] != 1 else ''}, "
             f"{r['train_images_per_second']:,.0f} train img/s)"]
    if r.get("best_epoch"):
        lines.append(f"best val accuracy {100 * r['best_val_accuracy']:.2f}% at epoch {r['best_epoch']}: "
                     f"test accuracy {_percent(r['test_accuracy'])} (last epoch: {_percent(r['final_test_accuracy'])})")
    if r.get("val_is_test"):
        lines.append("note: --val-size 0 selected the checkpoint on the test set, so its test accuracy is optimistic")
    if r.get("restarts"):
        lines.append(f"restored from checkpoints at epochs {r['restarts']}")
    if r.get("stopped"):
        lines.append(f"stopped early: {r['stopped']}")
    lines.append(f"best checkpoint: {r['best_checkpoint']}")
    return lines


def curves_png(history: list[dict]) -> bytes:
    """Loss, accuracy and LR by epoch, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for split in ("train", "val", "test"):
        kept = [h for h in history if h.get(f"{split}_loss") is not None]  # test: not every epoch (--test-every)
        if kept:
            style = {"marker": "o"} if len(kept) < len(history) else {}
            axes[0].plot([h["epoch"] for h in kept], [h[f"{split}_loss"] for h in kept], label=split, **style)
            axes[1].plot([h["epoch"] for h in kept], [100 * h[f"{split}_accuracy"] for h in kept], label=split, **style)
    axes[0].set(title="loss (cross-entropy)", xlabel="epoch", yscale="log")
    axes[1].set(title="accuracy (%)", xlabel="epoch")
    axes[2].plot(ep, [h["lr"] for h in history])
    cuts = [h["epoch"] for h in history if h.get("lr_cut")]
    if cuts:
        axes[2].scatter(cuts, [history[ep.index(c)]["lr"] for c in cuts], marker="v", color="red", label="plateau cut")
        axes[2].legend()
    axes[2].set(title="learning rate", xlabel="epoch", yscale="log")
    axes[0].legend()
    axes[1].legend()
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return _png(fig)


def confusion_png(matrix: np.ndarray, classes: tuple[str, ...], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title=title)
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _png(fig)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
