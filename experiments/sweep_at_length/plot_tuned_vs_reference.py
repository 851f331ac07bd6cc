"""The 12-epoch sweep's winner at 200 epochs, stopped at 84, against the default recipe's two 200-epoch runs.

Reads the per-epoch history that every checkpoint and results.json carry, writes
docs/figures/tuned_vs_reference.png and prints the numbers docs/results.md quotes. Run from the repository root:
`python experiments/sweep_at_length/plot_tuned_vs_reference.py`.
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from distributed_resnet import checkpoint

HERE = Path(__file__).parent
TUNED = HERE / "resnet20v1_tuned" / "checkpoint_epoch_0084"
RUNS = {
    "default recipe, 45k train / 5k val (results/resnet20v1)": Path("results/resnet20v1/results.json"),
    "default recipe, reference protocol (results/resnet20v1_reference_protocol)":
        Path("results/resnet20v1_reference_protocol/results.json"),
}


def main() -> None:
    histories = {name: json.loads(path.read_text())["history"] for name, path in RUNS.items()}
    histories["12-epoch sweep winner (stopped at 84)"] = checkpoint.load(str(TUNED))["history"]
    fig, (acc, lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for (name, history), color in zip(histories.items(), ["tab:blue", "tab:green", "tab:red"]):
        epochs = [e["epoch"] for e in history]
        acc.plot(epochs, [100 * e["test_accuracy"] for e in history], color=color, label=f"{name}: test")
        if not name.startswith("default recipe, reference"):  # there val is the test set
            acc.plot(epochs, [100 * e["val_accuracy"] for e in history], color=color, ls=":", label=f"{name}: val")
        lr.semilogy(epochs, [e["lr"] for e in history], color=color)
        best = max(history, key=lambda e: e["val_accuracy"])
        floor = next((e["epoch"] for e in history if e["lr"] <= 5e-7 * 1.0001), None)
        print(f"{name}: {len(history)} epochs, best val {100 * best['val_accuracy']:.2f}% at epoch {best['epoch']} "
              f"(test {100 * best['test_accuracy']:.2f}%), last test {100 * history[-1]['test_accuracy']:.2f}%, "
              f"test at epoch 84 {100 * history[83]['test_accuracy']:.2f}%, LR floor from epoch {floor}")
    acc.axhline(90.65, color="gray", lw=0.8, ls="--", label="reference's 90.65%")
    acc.set_ylim(80, 92)
    acc.set_ylabel("accuracy (%)")
    acc.legend(fontsize=7, loc="lower right")
    acc.set_title("ResNet-20 v1 on CIFAR-10, 200 epochs, 1 CPU worker")
    lr.set_ylabel("LR")
    lr.set_xlabel("epoch")
    out = Path("docs/figures/tuned_vs_reference.png")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
