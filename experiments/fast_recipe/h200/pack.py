"""Pack the newest and the best checkpoint of every run under ROOT into OUT/checkpoints.tgz.NN (15 MB pieces:
the device tool brings back 8 files of at most 16 MB). Usage: python pack.py ROOT OUT"""
import io, json, sys, tarfile
from pathlib import Path

root, out = Path(sys.argv[1]), Path(sys.argv[2])
keep = set()
for folder in {p.parent for p in root.rglob("checkpoint_epoch_*")}:
    ckpts = sorted(folder.glob("checkpoint_epoch_*"))
    keep.add(ckpts[-1])
    results = folder / "results.json"
    if results.is_file():
        best = json.loads(results.read_text()).get("best_checkpoint")
        if best and Path(best).is_dir():
            keep.add(Path(best))
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    for path in sorted(keep):
        tar.add(path, arcname=str(path.relative_to(root)))
data, piece = buf.getvalue(), 15 * 2**20
for i in range(0, len(data), piece):
    (out / f"checkpoints.tgz.{i // piece:02d}").write_bytes(data[i:i + piece])
print(f"packed {len(keep)} checkpoints, {len(data) / 2**20:.1f} MB")
