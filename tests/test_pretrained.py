"""The shipped pretrained model (results/resnet20v1) still scores exactly what its results.json claims."""

import json

import pytest

from conftest import REPO

PUBLISHED = REPO / "results" / "resnet20v1"


@pytest.mark.skipif(not (PUBLISHED / "checkpoint.pt").is_file(),
                    reason="the 200-epoch run is not published yet (results/resnet20v1)")
def test_shipped_weights_score_the_reported_test_accuracy(cifar_root):
    import distributed_resnet
    from distributed_resnet.evaluate import evaluate_checkpoint

    claimed = json.loads((PUBLISHED / "results.json").read_text())
    evaluated = evaluate_checkpoint(str(PUBLISHED), str(cifar_root), device="cpu")
    assert evaluated["test_images"] == 10_000
    assert evaluated["test_accuracy"] == claimed["test_accuracy"]
    assert evaluated["epoch"] == claimed["best_epoch"]
    assert json.loads((PUBLISHED / "eval.json").read_text())["test_accuracy"] == claimed["test_accuracy"]
    assert distributed_resnet.load_pretrained(str(PUBLISHED)).fc.out_features == 10
