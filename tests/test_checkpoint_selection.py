"""One rule for the best checkpoint everywhere: the highest val accuracy, the latest epoch on ties (as Ray keeps)."""

import pandas as pd

from distributed_resnet import checkpoint as ckpt
from distributed_resnet.sweeps.progress import best_row

VAL = [0.5, 0.7, 0.7, 0.7]  # three epochs tied for best


def _write_run(run_dir):
    for epoch, val in enumerate(VAL, start=1):
        metrics = {"epoch": epoch, "val_accuracy": val}
        ckpt.save(run_dir / ckpt.dir_name(epoch), {"model": {}, "meta": {"epoch": epoch, "metrics": metrics}})


def test_local_keeper_and_best_in_keep_the_latest_of_tied_epochs(tmp_path):
    _write_run(tmp_path)
    assert ckpt.best_in(tmp_path).name == ckpt.dir_name(4)
    ckpt.LocalKeeper(tmp_path, num_to_keep=1).prune()
    assert sorted(p.name for p in tmp_path.glob("checkpoint_epoch_*")) == [ckpt.dir_name(4)]


def test_sweep_summary_picks_the_tied_epoch_ray_keeps():
    """Ray's CheckpointConfig(num_to_keep=2) keeps epochs 3 and 4 of these (latest on ties): the summary must name
    one of those, not epoch 2, whose folder is gone."""
    df = pd.DataFrame({"epoch": [1, 2, 3, 4, 5], "val_accuracy": VAL + [float("nan")],
                       "checkpoint_path": [f"c{e}" for e in range(1, 6)]})
    assert best_row(df, "val_accuracy", 1)["epoch"] == 4
    df["val_loss"] = [0.9, 0.8, 0.8, 0.8, 0.85]
    assert best_row(df, "val_loss", -1)["epoch"] == 4


def test_remote_checkpoint_paths_get_their_scheme_back():
    from distributed_resnet.storage import as_uri

    assert as_uri("bucket/runs/r/checkpoint_epoch_0001", "s3://bucket/runs") == "s3://bucket/runs/r/checkpoint_epoch_0001"
    assert as_uri("/tmp/x/r/c", "file:///tmp/x") == "file:///tmp/x/r/c"
    assert as_uri("/local/r/c", "/local") == "/local/r/c" and as_uri(None, "s3://b") is None
