"""Every published run under results/ still scores exactly what its results.json
claims, on the 10,000 test images."""

import json

import pytest

from conftest import REPO

PUBLISHED = sorted(p for p in (REPO / "results").iterdir() if (p / "checkpoint.pt").is_file())


@pytest.mark.parametrize("published", PUBLISHED, ids=[p.name for p in PUBLISHED])
def test_shipped_weights_score_the_reported_test_accuracy(published, cifar_root):
    import distributed_resnet
    from distributed_resnet.evaluate import evaluate_checkpoint

    claimed = json.loads((published / "results.json").read_text())
    evaluated = evaluate_checkpoint(str(published), str(cifar_root), device="cpu")
    assert evaluated["test_images"] == 10_000
    assert evaluated["test_accuracy"] == claimed["test_accuracy"]
    assert evaluated["epoch"] == claimed["best_epoch"]
    assert json.loads((published / "eval.json").read_text())["test_accuracy"] == claimed["test_accuracy"]
    assert distributed_resnet.load_pretrained(str(published)).fc.out_features == 10


def test_resnet20v1_is_published():
    assert REPO / "results" / "resnet20v1" in PUBLISHED


def test_the_fast_recipe_is_published_at_the_references_accuracy_in_30_epochs():
    """The claim the test above re-checks: a `--recipe fast` run of at most 30 epochs at >= 90.65% test."""
    fast = REPO / "results" / "resnet20v1_fast"
    assert fast in PUBLISHED
    claimed = json.loads((fast / "results.json").read_text())
    assert claimed["config"]["recipe"] == "fast" and claimed["epochs"] <= 30
    assert claimed["test_accuracy"] >= 0.9065


def test_the_reference_protocol_is_published_at_200_epochs():
    """The reference's own protocol: 200 epochs on all 50,000 training images, the checkpoint selected on test."""
    ref = REPO / "results" / "resnet20v1_reference_protocol"
    assert ref in PUBLISHED
    claimed = json.loads((ref / "results.json").read_text())
    assert claimed["epochs"] == 200 and claimed["config"]["val_size"] == 0
    assert claimed["config"]["lr_policy"] == "keras" and claimed["config"]["lr"] == 1e-3
