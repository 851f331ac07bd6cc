"""The PyTorch implementation against Keras itself (on its PyTorch backend, CPU; no TensorFlow).

Each part of the recipe is compared with the reference's own code (`keras_reference.py`, copied from
keras-team/keras `examples/cifar10_resnet.py`) or Keras' own classes:
- the model: reference-built Keras ResNets, weights copied over by `convert.keras_to_state_dict`, give the
  same logits on real CIFAR-10 images, in inference mode and in one training-mode step (BN statistics);
- the LR policy: `LRPolicy` against `LearningRateScheduler` + `ReduceLROnPlateau` over 200 epochs;
- the augmentation: `shift_images` against `ImageDataGenerator.apply_transform`;
- the converter: `.keras` and `.h5` files, through the function and the CLI, and its one-line errors.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is first imported

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

keras = pytest.importorskip("keras")
pytest.importorskip("scipy")  # ImageDataGenerator's resampling

import keras_reference as ref  # noqa: E402
from conftest import run_cli  # noqa: E402

from distributed_resnet.augment import shift_images  # noqa: E402
from distributed_resnet.cli import main_guard  # noqa: E402
from distributed_resnet.errors import UserError  # noqa: E402
from distributed_resnet.convert import check_same_function, convert, keras_to_state_dict  # noqa: E402
from distributed_resnet.convert import main as convert_main  # noqa: E402
from distributed_resnet.data import load_arrays  # noqa: E402
from distributed_resnet.evaluate import load_model  # noqa: E402
from distributed_resnet.model import ResNet  # noqa: E402
from distributed_resnet.schedule import LRPolicy  # noqa: E402

DEPTH = {1: 20, 2: 20}  # v2 20 = 9*2+2: two blocks per stage, so identity-shortcut blocks too


VERSIONS = [pytest.param(1, id="v1"), pytest.param(2, id="v2")]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def cifar(mini_dir):
    """64 real test images (NHWC for Keras, NCHW for us) and 16 training images for BN calibration, in [0, 1]."""
    train, test, _ = load_arrays(mini_dir)
    test_x = np.asarray(test.images[:64], dtype=np.float32) / 255
    return {"nhwc": test_x, "nchw": torch.from_numpy(test_x).permute(0, 3, 1, 2).contiguous(),
            "calib": np.asarray(train.images[:16], dtype=np.float32) / 255,
            "train": np.asarray(train.images[:24], dtype=np.float32) / 255}


def _reference_model(version: int, calib: np.ndarray):
    """The reference's model with non-trivial weights: random biases, BN gammas and betas, and BN moving
    statistics set from one real batch (momentum 0 for that one training-mode call), so every parameter counts."""
    keras.utils.set_random_seed(version)
    kmodel = (ref.resnet_v1 if version == 1 else ref.resnet_v2)((32, 32, 3), DEPTH[version])
    rng = np.random.default_rng(version)
    bns = []
    for layer in kmodel.layers:
        w = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            bns.append(layer)
            layer.set_weights([rng.uniform(0.5, 1.5, w[0].shape).astype(np.float32),
                               rng.normal(0, 0.2, w[1].shape).astype(np.float32), w[2], w[3]])
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            layer.set_weights([w[0], rng.normal(0, 0.05, w[1].shape).astype(np.float32)])
    for layer in bns:
        layer.momentum = 0.0
    kmodel(calib, training=True)
    for layer in bns:
        layer.momentum = 0.99
    return kmodel


@pytest.fixture(scope="module")
def keras_models(cifar):
    return {v: _reference_model(v, cifar["calib"]) for v in (1, 2)}


def _dense(kmodel):
    return [layer for layer in kmodel.layers if isinstance(layer, keras.layers.Dense)][-1]


def keras_logits(kmodel, x: np.ndarray, training: bool = False) -> np.ndarray:
    """The Keras model's output with its last Dense's softmax taken out: the logits, exactly."""
    dense = _dense(kmodel)
    activation, dense.activation = dense.activation, keras.activations.linear
    try:
        return keras.ops.convert_to_numpy(kmodel(x, training=training))
    finally:
        dense.activation = activation


_logits_cache = {}


def reference_logits(version, keras_models, cifar) -> np.ndarray:
    if version not in _logits_cache:
        _logits_cache[version] = keras_logits(keras_models[version], cifar["nhwc"])
    return _logits_cache[version]


def ours(state: dict, depth: int, version: int, padding: str = "same") -> ResNet:
    model = ResNet(depth, version, padding=padding).eval()
    model.load_state_dict(state)
    return model


@torch.no_grad()
def our_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    return model(x).numpy()


# ---------------------------------------------------------------- the model

@pytest.mark.parametrize("version", VERSIONS)
def test_logits_match_reference_keras_model(version, keras_models, cifar):
    kmodel = keras_models[version]
    state, depth, found_version = keras_to_state_dict(kmodel)
    assert (depth, found_version) == (DEPTH[version], version)
    expected = reference_logits(version, keras_models, cifar)
    assert np.abs(expected).max() > 1  # logits of a real spread, not all near zero
    same = our_logits(ours(state, depth, version), cifar["nchw"])
    diff = np.abs(same - expected).max()
    print(f"v{version} max |logit difference| {diff:.2e}")
    assert diff <= 1e-4
    # Keras' own output is the softmax of those logits.
    probs = keras.ops.convert_to_numpy(kmodel(cifar["nhwc"][:8], training=False))
    np.testing.assert_allclose(F.softmax(torch.from_numpy(same[:8]), 1).numpy(), probs, atol=1e-5)
    symmetric = np.abs(our_logits(ours(state, depth, version, "symmetric"), cifar["nchw"]) - expected).max()
    if version == 1:
        assert symmetric > 0.1  # PyTorch's symmetric padding is another function: 'same' padding matters
    else:
        assert symmetric <= 1e-4  # v2 strides only with 1x1 convs, where 'same' pads nothing: no difference


def test_layer_names_need_not_start_at_zero(keras_models):
    """Keras numbers layers per session, so the second model built starts at conv2d_<k>: the converter sorts by
    that number (conv2d_9 before conv2d_10), not by position in `model.layers`."""
    names = [layer.name for layer in keras_models[2].layers if isinstance(layer, keras.layers.Conv2D)]
    assert names[0] != "conv2d" and len(names) > 10


def _bn_pairs(kmodel, model: ResNet):
    """(Keras BN layer, our BatchNorm2d) in the reference's creation order."""
    keras_bns = sorted((layer for layer in kmodel.layers if isinstance(layer, keras.layers.BatchNormalization)),
                       key=lambda layer: int(layer.name.rsplit("_", 1)[1]) if layer.name[-1].isdigit() else 0)
    our_bns = [m for part in (model.stem, model.blocks, model.head_norm) for m in part.modules()
               if isinstance(m, nn.BatchNorm2d)]
    assert len(keras_bns) == len(our_bns)
    return list(zip(keras_bns, our_bns))


@pytest.mark.parametrize("version", VERSIONS)
def test_training_step_batchnorm_statistics(version, keras_models, cifar):
    """One training-mode forward: same outputs (both normalise with the biased batch variance), and the same moving
    means and moving variances: the project's BatchNorm folds the biased batch variance in, as Keras does (torch's
    own BatchNorm2d folds the unbiased one, n/(n-1) larger; that is measured below too)."""
    kmodel = keras_models[version]
    state, depth, _ = keras_to_state_dict(kmodel)
    model = ours(state, depth, version).train()
    x = cifar["nhwc"][:8]
    saved = kmodel.get_weights()
    try:
        old = [(keras.ops.convert_to_numpy(k.moving_mean), keras.ops.convert_to_numpy(k.moving_variance))
               for k, _ in _bn_pairs(kmodel, model)]
        expected = keras_logits(kmodel, x, training=True)
        new = [(keras.ops.convert_to_numpy(k.moving_mean), keras.ops.convert_to_numpy(k.moving_variance))
               for k, _ in _bn_pairs(kmodel, model)]
    finally:
        kmodel.set_weights(saved)
    with torch.no_grad():
        logits = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    assert np.abs(logits - expected).max() <= 1e-4

    # Elements per channel that each BN layer saw: batch x H x W of its input.
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0] * i[0].shape[2] * i[0].shape[3]))
             for _, m in _bn_pairs(kmodel, model)]
    with torch.no_grad():
        model.eval()(torch.zeros(8, 3, 32, 32))
    for h in hooks:
        h.remove()

    mean_diff, var_rel, bessel_rel = 0.0, 0.0, 0.0
    for ((_, bn), (m0, v0), (m1, v1), n) in zip(_bn_pairs(kmodel, model), old, new, sizes):
        mean_diff = max(mean_diff, np.abs(bn.running_mean.numpy() - m1).max())
        var_rel = max(var_rel, (np.abs(bn.running_var.numpy() - v1) / v1).max())
        batch_var = (v1 - 0.99 * v0) / 0.01  # Keras' (biased) batch variance, recovered from its update
        torchs = 0.99 * v0 + 0.01 * batch_var * n / (n - 1)  # what torch.nn.BatchNorm2d would hold
        bessel_rel = max(bessel_rel, (np.abs(torchs - v1) / v1).max())
    print(f"v{version}: BN moving mean max |diff| {mean_diff:.2e}; moving variance max relative diff {var_rel:.2e} "
          f"(torch's unbiased update would differ by {bessel_rel:.2e})")
    assert mean_diff <= 1e-6
    assert var_rel <= 2e-6
    assert bessel_rel > 20 * var_rel  # the difference the biased update closes is far above what remains


def test_a_changed_function_is_caught(keras_models):
    """The weights alone cannot show a missing ReLU; the converter's output check does."""
    kmodel = keras_models[1]
    relu = next(layer for layer in kmodel.layers if isinstance(layer, keras.layers.Activation))
    activation, relu.activation = relu.activation, keras.activations.linear
    try:
        state, depth, version = keras_to_state_dict(kmodel)
        with pytest.raises(UserError, match="computes another function"):
            check_same_function(kmodel, state, depth, version)
    finally:
        relu.activation = activation
    assert check_same_function(kmodel, state, depth, version) <= 1e-5


# ---------------------------------------------------------------- the learning-rate policy

STEP_EPOCHS = 200
MIN_LR = 0.5e-6


def _val_losses() -> list[float]:
    """Improve, plateau (cuts every 5 epochs), improve, creep by less than min_delta per epoch (only every
    third epoch is an improvement: no cut), plateau, improve, plateau with one late improvement."""
    rng = np.random.default_rng(0)
    losses, best = [], 2.0

    def plateau(k):
        losses.extend(best + rng.uniform(0.001, 0.05, k))

    def improve(k, step):
        nonlocal best
        for _ in range(k):
            best -= step
            losses.append(best)

    improve(20, 0.05)
    plateau(25)
    improve(15, 0.02)
    losses.extend(best - 4e-5 * np.arange(1, 16))  # steps of 0.4 min_delta: every third one improves
    best = losses[-1]  # the 15th is an improvement
    plateau(45)
    improve(20, 0.01)
    plateau(30)
    improve(1, 0.01)
    plateau(STEP_EPOCHS - len(losses))
    assert len(losses) == STEP_EPOCHS
    return [float(v) for v in losses]


def _keras_lrs(policy: str, losses: list[float]) -> tuple[list[float], list[int]]:
    """The reference's callbacks on a tiny compiled model, driven epoch by epoch without training."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3), loss="mse")
    if policy == "keras":
        scheduler = keras.callbacks.LearningRateScheduler(ref.lr_schedule)
    else:  # the schedule keeps the plateau cuts in the LR and applies only its own step ratios
        def schedule(epoch, lr):
            return max(lr * ref.lr_schedule(epoch) / ref.lr_schedule(max(epoch - 1, 0)), MIN_LR)

        scheduler = keras.callbacks.LearningRateScheduler(schedule)
    reducer = keras.callbacks.ReduceLROnPlateau(factor=np.sqrt(0.1), cooldown=0, patience=5, min_lr=MIN_LR)
    for cb in (reducer, scheduler):
        cb.set_model(model)
        cb.on_train_begin()
    lrs, cuts = [], []
    for epoch, loss in enumerate(losses):
        scheduler.on_epoch_begin(epoch)
        lrs.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
        reducer.on_epoch_end(epoch, logs={"val_loss": loss})  # it adds "learning_rate" to the logs itself
        if float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) < lrs[-1]:
            cuts.append(epoch + 1)
    return lrs, cuts


@pytest.mark.parametrize("policy", ["keras", "compose"])
def test_lr_policy_matches_keras_callbacks(policy):
    losses = _val_losses()
    expected, keras_cuts = _keras_lrs(policy, losses)
    pol = LRPolicy(1e-3, policy, factor=math.sqrt(0.1), patience=5, min_lr=MIN_LR, cooldown=0)
    got = []
    for epoch, loss in enumerate(losses):
        got.append(pol.lr(epoch))
        pol.end_epoch(epoch, loss)
    rel = max(abs(g - e) / e for g, e in zip(got, expected))
    print(f"{policy}: max relative LR difference {rel:.2e} over {len(got)} epochs; cuts at {keras_cuts}")
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
    assert pol.state.cuts == keras_cuts and len(keras_cuts) >= (20 if policy == "keras" else 6)
    if policy == "keras":  # the cuts are overwritten: the LR is the step schedule
        assert got == [ref.lr_schedule(e) for e in range(STEP_EPOCHS)]
    else:  # the cuts persist, down to the min_lr floor, long before the schedule alone would get there
        floor = [e for e, lr in enumerate(got) if lr == MIN_LR]
        assert floor and floor[0] < 120 and floor == list(range(floor[0], STEP_EPOCHS))
        assert len(keras_cuts) < len(_keras_lrs("keras", losses)[1])  # no cuts once on the floor


# ---------------------------------------------------------------- the augmentation

def test_shift_and_flip_match_image_data_generator(cifar):
    """Keras' apply_transform({"tx", "ty", "flip_horizontal"}) samples the input at (i + ty, j + tx), then
    mirrors: our dy = -ty, dx = -tx. Fractional shifts (bilinear) and whole-pixel ones (exact gathers)."""
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    gen = ImageDataGenerator(width_shift_range=0.1, height_shift_range=0.1, horizontal_flip=True,
                             fill_mode="nearest")
    images = cifar["train"]
    n = len(images)
    rng = np.random.default_rng(0)
    frac = rng.uniform(-3.2, 3.2, (n, 2))
    frac[:4] = [[3.2, -3.2], [-3.2, 3.2], [0.5, 0.0], [0.0, -1.75]]  # the extremes and single-axis shifts
    whole = rng.integers(-3, 4, (n, 2))
    flip = np.arange(n) % 2 == 0
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    worst = {}
    for name, shifts in (("fractional", frac), ("whole-pixel", whole)):
        ty, tx = shifts[:, :1], shifts[:, 1:]
        expected = np.stack([gen.apply_transform(img, {"tx": float(a), "ty": float(b), "flip_horizontal": bool(f)})
                             for img, a, b, f in zip(images, tx[:, 0], ty[:, 0], flip)])
        dy, dx = torch.from_numpy(-ty), torch.from_numpy(-tx)
        if name == "fractional":
            dy, dx = dy.float(), dx.float()
        got = shift_images(x, dy, dx, torch.from_numpy(flip)[:, None]).permute(0, 2, 3, 1).numpy()
        worst[name] = np.abs(got - expected).max()
        wrong_sign = shift_images(x, -dy, -dx, torch.from_numpy(flip)[:, None]).permute(0, 2, 3, 1).numpy()
        assert np.abs(wrong_sign - expected).max() > 0.1  # the mapping is pinned, not a symmetric accident
    print(f"max |difference| vs apply_transform: {worst}")
    assert worst["fractional"] <= 1e-5 and worst["whole-pixel"] == 0.0


# ---------------------------------------------------------------- the converter

def test_convert_keras_and_h5_files(keras_models, cifar, tmp_path):
    """The `.keras` file through the function, the legacy `.h5` file through the CLI; both load with `evaluate`."""
    kmodel = keras_models[1]
    expected = reference_logits(1, keras_models, cifar)
    for ext in ("keras", "h5"):
        kmodel.save(tmp_path / f"resnet20v1.{ext}")
    meta = convert(tmp_path / "resnet20v1.keras", tmp_path / "keras", depth=20, version=1)
    assert (meta["depth"], meta["version"], meta["padding"], meta["parameters"]) == (20, 1, "same", 273_066)
    proc = run_cli("convert", "--keras", str(tmp_path / "resnet20v1.h5"), "--output", str(tmp_path / "h5"),
                   timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ResNet-20 v1" in proc.stdout
    for ext in ("keras", "h5"):
        model, loaded_meta = load_model(str(tmp_path / ext))
        assert loaded_meta["source"] == f"keras:{tmp_path / f'resnet20v1.{ext}'}"
        assert np.abs(our_logits(model, cifar["nchw"]) - expected).max() <= 1e-4
    with pytest.raises(UserError, match="is ResNet-20 v1, not ResNet-32 v1"):
        convert(tmp_path / "resnet20v1.keras", tmp_path / "other", depth=32)
    with pytest.raises(UserError, match="already holds a checkpoint"):
        convert(tmp_path / "resnet20v1.keras", tmp_path / "keras")


def _one_line_error(code, stderr, fragment):
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], stderr


def test_not_a_keras_model_file(tmp_path):
    text = tmp_path / "model.keras"
    text.write_text("not a model\n")
    proc = run_cli("convert", "--keras", str(text), "--output", str(tmp_path / "out"), timeout=120)
    _one_line_error(proc.returncode, proc.stderr, "is not a Keras model file")
    assert not (tmp_path / "out").exists()


def test_another_architecture_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import sys
    import zipfile

    from distributed_resnet.convert import load_keras

    archive = tmp_path / "other.keras"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme.txt", "a zip, not a model")
    with pytest.raises(UserError, match="could not be loaded as a Keras model"):
        load_keras(archive)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "keras", None)  # as if Keras were not installed
        with pytest.raises(UserError, match=r"pip install 'distributed-resnet\[keras\]'"):
            load_keras(archive)
    small = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3, padding="same"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation="softmax")])
    small.save(tmp_path / "small.keras")
    with pytest.raises(SystemExit) as e:
        main_guard(lambda: convert_main(["--keras", str(tmp_path / "small.keras"), "--output", str(tmp_path / "o")]))
    _one_line_error(e.value.code, capsys.readouterr().err, "1 Conv2D layers: not a reference ResNet")
    # A reference ResNet-20 for 100 classes: the right layers, one wrong shape, named.
    keras.utils.set_random_seed(0)
    with pytest.raises(UserError, match=r"dense\S*: kernel has shape \(64, 100\), ResNet-20 v1 needs \(64, 10\)"):
        keras_to_state_dict(ref.resnet_v1((32, 32, 3), 20, num_classes=100))
