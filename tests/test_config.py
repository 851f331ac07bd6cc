import pytest

from distributed_resnet.config import TrainConfig
from distributed_resnet.errors import UserError


def test_defaults_are_the_reference_recipe():
    c = TrainConfig().validate()
    assert (c.depth, c.version, c.epochs, c.batch_size, c.lr, c.lr_policy) == (20, 1, 200, 128, 1e-3, "keras")
    assert c.plateau_factor == pytest.approx(0.1 ** 0.5) and c.plateau_patience == 5 and c.plateau_min_lr == 0.5e-6
    assert c.weight_decay == 1e-4


@pytest.mark.parametrize("kwargs,message", [
    ({"depth": 21}, "--depth 21 is not 6n\\+2 for ResNet v1; try 20 or 26"),
    ({"depth": 20, "version": 3}, "--version must be 1 or 2"),
    ({"depth": 32, "version": 2}, "9n\\+2"),
    ({"epochs": -3}, "--epochs must be a positive integer, got -3"),
    ({"batch_size": 0}, "--batch-size must be a positive integer"),
    ({"lr": 0.0}, "--lr must be a positive number"),
    ({"lr_policy": "cosine"}, "--lr-policy must be"),
    ({"plateau_factor": 1.5}, "--plateau-factor must be in"),
    ({"num_workers": -1}, "--num-workers must be >= 0"),
    ({"val_size": -5}, "--val-size must be >= 0"),
    ({"batch_size": 2, "num_workers": 3}, "every worker needs at least one per step"),
    ({"num_workers": 2, "use_gpu": True, "gpus_per_worker": 0.5}, "would share one GPU, which NCCL refuses"),
    ({"precision": "fp16"}, "--precision must be one of auto, bf16, fp32"),
    ({"padding": "valid"}, "--padding must be one of same, symmetric"),
    ({"shift": "cubic"}, "--shift must be one of bilinear, pixel"),
    ({"flip": "sometimes"}, "--flip must be one of random, alternate"),
    ({"schedule_epochs": 0}, "--schedule-epochs must be a positive integer"),
    ({"lr": 1e-7}, "--plateau-min-lr 5e-07 must be below --lr 1e-07"),
    ({"deterministic": True}, "--deterministic computes in fp32: add --precision fp32 \\(not auto"),
    ({"deterministic": True, "precision": "fp32", "batchnorm": "local"}, "drop --batchnorm local"),
    ({"progressive_resize": "16-10"}, "--progressive-resize takes SIZE:EPOCHS"),
    ({"progressive_resize": "40:2"}, "sizes of 8 to 32 px"),
    ({"recipe": "fast", "progressive_resize": "16:20,24:10"}, "leaves none of the 30 epochs of the schedule at full size"),
])
def test_invalid_values_are_one_line_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message) as e:
        TrainConfig(**kwargs).validate()
    assert "\n" not in str(e.value)


def test_one_worker_may_share_a_gpu():
    """Fractions are for Tune trials of one worker each (several trials on one GPU)."""
    TrainConfig(num_workers=1, use_gpu=True, gpus_per_worker=0.25).validate()


def test_per_worker_batch_scales_global_batch():
    assert TrainConfig(per_worker_batch_size=64, num_workers=4).validate().global_batch_size == 256
    assert TrainConfig(batch_size=128, num_workers=4).global_batch_size == 128


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(UserError, match="unknown training setting\\(s\\) lr_sheduler"):
        TrainConfig.from_dict({"lr": 1e-3, "lr_sheduler": "x"})
    assert TrainConfig.from_dict(TrainConfig(lr=2e-3).to_dict()).lr == 2e-3


def test_a_resume_keeps_the_recipe_of_a_checkpoint_older_than_its_setting():
    """Checkpoints from before --batchnorm trained with per-worker statistics: resuming one under the new default
    (global) would change the run, so it is refused; --batchnorm local continues it."""
    from distributed_resnet.driver import check_same_recipe

    saved = {k: v for k, v in TrainConfig(num_workers=2).to_dict().items() if k != "batchnorm"}
    with pytest.raises(UserError, match=r"--batchnorm local \(not global\)"):
        check_same_recipe(saved, TrainConfig(num_workers=2), "old")
    check_same_recipe(saved, TrainConfig(num_workers=2, batchnorm="local"), "old")
    check_same_recipe(saved, TrainConfig(num_workers=4, batchnorm="local", precision="fp32", epochs=300), "old")
    # Checkpoints from before --flip drew a coin per image and epoch.
    saved = {k: v for k, v in TrainConfig(recipe="fast").validate().to_dict().items() if k != "flip"}
    check_same_recipe(saved, TrainConfig(recipe="fast", flip="random"), "old")
    with pytest.raises(UserError, match=r"--flip random \(not alternate\)"):
        check_same_recipe(saved, TrainConfig(recipe="fast", flip="alternate"), "old")


def test_progressive_resize_gives_each_epoch_its_side():
    cfg = TrainConfig(recipe="fast", progressive_resize="16:2, 24:1").validate()
    assert [cfg.train_size(e) for e in range(5)] == [16, 16, 24, None, None]
    assert cfg.recipe_text().endswith("30 epochs, 2 at 16 px, 1 at 24 px, then full size")
    assert TrainConfig(recipe="fast").train_size(0) is None
