import json, sys
runs = {n: json.load(open(f"/work/det-runs/{n}/results.json"))["history"] for n in sys.argv[1:]}
ref = runs[sys.argv[1]]
for n, h in runs.items():
    cells = []
    for key in ("train_loss", "val_loss"):
        cells.append(" / ".join(f"{abs(g[key] / r[key] - 1):.1e}" if n != sys.argv[1] else f"{g[key]:.6f}" for g, r in zip(h, ref)))
    acc = " / ".join(f"{g['val_accuracy']*100:.2f}%" for g in h)
    ips = " / ".join(f"{g['images_per_second']:.0f}" for g in h)
    eq = all(g["train_loss"] == r["train_loss"] and g["val_loss"] == r["val_loss"] for g, r in zip(h, ref))
    print(f"| {n} | {cells[0]} | {cells[1]} | {acc} | {ips} | {'identical' if eq else ''} |")
