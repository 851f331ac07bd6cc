"""`python -m distributed_resnet.convert --keras MODEL.keras --output DIR`: a Keras reference model as a checkpoint.

Why: this project follows Keras' `examples/cifar10_resnet.py`. A model built (and trained) by that script,
converted, is a weights-only checkpoint that `evaluate`, `load_pretrained` and `train --init-weights` read like
any other, and converting is how `tests/test_keras_equivalence.py` shows that `model.py` computes the reference's
function.

How: Keras names layers `conv2d`, `conv2d_1`, ... in creation order (the numbering may start anywhere), and
`model.py` creates the stem, each block's layers and the head in the reference's order, so the k-th Conv2D
(BatchNormalization, Dense) by name number is our k-th Conv2d (BatchNorm2d, Linear) in stem, blocks, head
order. Depth and version follow from the number of Conv2D layers (v1: 6n+3, v2: 9n+4). Every shape is checked,
then both models classify the same random images: the checkpoint is written only if they agree.

The weights are converted as they are: a model trained by the reference script (`subtract_pixel_mean = True`)
expects images minus the training set's per-pixel mean, which this project does not subtract.
"""

from __future__ import annotations

import os
import re
import sys
import zipfile
from pathlib import Path

from .cli import Parser, main_guard
from .errors import UserError

TOLERANCE = 1e-4  # max |difference| of the two models' outputs (probabilities or logits) on random images


def _model_file(path: str | Path) -> Path:
    """The path, if it is a .keras (zip) or .h5 (HDF5) file: checked before the slow imports."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"no Keras model at {path}")
    with open(path, "rb") as f:
        is_h5 = f.read(8) == b"\x89HDF\r\n\x1a\n"
    if not (is_h5 or zipfile.is_zipfile(path)):
        raise UserError(f"{path} is not a Keras model file (a .keras zip archive or an HDF5 .h5 file)")
    return path


def load_keras(path: str | Path):
    """`keras.models.load_model(path, compile=False)`, with one-line errors for what is not a Keras model."""
    path = _model_file(path)
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"  # the only backend this project installs; never TensorFlow
    try:
        import keras
    except ImportError as e:
        raise UserError(f"converting needs Keras 3 ({e}): pip install 'distributed-resnet[keras]'")
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)  # no Lambda code, no arbitrary classes
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path} could not be loaded as a Keras model ({type(e).__name__}: {first})")
    if not isinstance(model, keras.Model):
        raise UserError(f"{path} holds a {type(model).__name__}, not a Keras model")
    return model


def _flat_layers(model):
    for layer in model.layers:
        yield from (_flat_layers(layer) if hasattr(layer, "layers") else [layer])


def _creation_order(layers):
    """Sorted by the numeric suffix Keras appends to auto names (`conv2d` = 0, `conv2d_1`, ..., `conv2d_10`)."""
    return sorted(layers, key=lambda l: int(m.group(1)) if (m := re.search(r"_(\d+)$", l.name)) else 0)


def _keras_shape(torch_shape) -> tuple:
    """Our tensor's shape in Keras' layout: conv (kh, kw, in, out), dense (in, out), vectors as they are."""
    s = tuple(torch_shape)
    if len(s) == 4:
        return s[2], s[3], s[1], s[0]
    return s[::-1]


def keras_to_state_dict(keras_model) -> tuple[dict, int, int]:
    """(state_dict for `ResNet(depth, version, padding="same")`, depth, version) from a reference Keras ResNet."""
    import numpy as np
    import torch
    from torch import nn

    from .model import ResNet

    kinds = {"Conv2D": [], "BatchNormalization": [], "Dense": []}
    for layer in _flat_layers(keras_model):
        if layer.weights:
            if type(layer).__name__ not in kinds:
                raise UserError(f"layer {layer.name} is a {type(layer).__name__}, which the reference ResNet has not")
            kinds[type(layer).__name__].append(layer)
    convs, bns, dense = (_creation_order(v) for v in kinds.values())
    c = len(convs)
    if (c - 3) % 6 == 0 and c >= 9:
        depth, version = c - 1, 1
    elif (c - 4) % 9 == 0 and c >= 13:
        depth, version = c - 2, 2
    else:
        raise UserError(f"{c} Conv2D layers: not a reference ResNet (v1 has 6n+3, v2 has 9n+4)")
    model = ResNet(depth, version, padding="same")
    state = model.state_dict()
    parts = ("stem", "blocks", "head_norm", "fc")  # the reference's order (ResNet registers head_norm earlier)
    ours = {kind: [(f"{p}.{n}" if n else p, m) for p in parts for n, m in getattr(model, p).named_modules()
                   if isinstance(m, kind)] for kind in (nn.Conv2d, nn.BatchNorm2d, nn.Linear)}
    where = f"ResNet-{depth} v{version}"
    for (kind, mods), keras_kind, layers in zip(ours.items(), kinds, (convs, bns, dense)):
        if len(layers) != len(mods):
            raise UserError(f"{len(layers)} {keras_kind} layers where {where} has {len(mods)}")
        for (name, m), layer in zip(mods, layers):
            weights = layer.get_weights()
            if kind is nn.Conv2d:
                if tuple(layer.strides) != m.stride or layer.padding != "same" or len(weights) != 2:
                    raise UserError(f"{layer.name}: strides {layer.strides}, padding {layer.padding!r}, "
                                    f"{len(weights)} weights; {where} needs {m.stride}, 'same', kernel and bias")
                weights[0] = weights[0].transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
                keys = ("weight", "bias")
            elif kind is nn.BatchNorm2d:
                if len(weights) != 4 or abs(layer.epsilon - m.eps) > 1e-9:
                    raise UserError(f"{layer.name}: {len(weights)} weights, epsilon {layer.epsilon}; {where} "
                                    f"needs gamma, beta, moving mean and variance, epsilon {m.eps}")
                keys = ("weight", "bias", "running_mean", "running_var")
            else:
                if len(weights) != 2:
                    raise UserError(f"{layer.name}: a Dense layer without bias; {where} needs one")
                weights[0] = weights[0].T  # (in, out) -> (out, in)
                keys = ("weight", "bias")
            for key, w, raw in zip(keys, weights, layer.weights):
                key = f"{name}.{key}"
                if tuple(w.shape) != tuple(state[key].shape):
                    raise UserError(f"{layer.name}: {raw.name} has shape {tuple(raw.shape)}, {where} needs "
                                    f"{_keras_shape(state[key].shape)}")
                state[key] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    return state, depth, version


def check_same_function(keras_model, state: dict, depth: int, version: int) -> float:
    """Run both models on the same random images (inference mode); a UserError if their outputs differ."""
    import keras
    import numpy as np
    import torch

    from .model import ResNet

    model = ResNet(depth, version, padding="same").eval()
    model.load_state_dict(state)
    x = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    try:
        expected = keras.ops.convert_to_numpy(keras_model(x, training=False))
    except Exception as e:
        raise UserError(f"the Keras model does not take 32x32x3 images ({type(e).__name__})")
    last_dense = _creation_order(l for l in _flat_layers(keras_model) if type(l).__name__ == "Dense")[-1]
    activation = last_dense.get_config().get("activation")
    with torch.no_grad():
        logits = model(torch.from_numpy(x).permute(0, 3, 1, 2))
    if activation == "softmax":
        ours = torch.softmax(logits, 1).numpy()
    elif activation in (None, "linear"):
        ours = logits.numpy()
    else:
        raise UserError(f"the last Dense layer has activation {activation!r}; expected softmax (or none)")
    diff = float(np.abs(ours - expected).max()) if ours.shape == expected.shape else float("inf")
    if not diff <= TOLERANCE:
        raise UserError(f"the weights fit ResNet-{depth} v{version}, but the Keras model computes another function "
                        f"(max output difference {diff:.3g}): not the reference architecture")
    return diff


def convert(keras_path: str | Path, output: str | Path, depth: int | None = None, version: int | None = None) -> dict:
    """Convert, check and write a weights-only checkpoint to `output`; returns its meta."""
    _model_file(keras_path)
    from . import checkpoint as ckpt
    from .model import ResNet, count_parameters

    output = Path(output).expanduser()
    if (output / ckpt.STATE_FILE).exists():
        raise UserError(f"{output} already holds a checkpoint: choose another --output")
    keras_model = load_keras(keras_path)
    state, found_depth, found_version = keras_to_state_dict(keras_model)
    if (depth or found_depth, version or found_version) != (found_depth, found_version):
        raise UserError(f"{keras_path} is ResNet-{found_depth} v{found_version}, not ResNet-{depth or found_depth} "
                        f"v{version or found_version} as --depth/--version say")
    diff = check_same_function(keras_model, state, found_depth, found_version)
    meta = {"depth": found_depth, "version": found_version, "padding": "same",
            "parameters": count_parameters(ResNet(found_depth, found_version)), "source": f"keras:{keras_path}",
            "keras_max_output_difference": diff}
    ckpt.save_weights(output, state, meta)
    return meta


def main(argv=None) -> int:
    p = Parser(prog="python -m distributed_resnet.convert", description=__doc__.split("\n")[0])
    p.add_argument("--keras", required=True, metavar="MODEL", help="a .keras or .h5 model from the reference script")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the weights-only checkpoint")
    p.add_argument("--depth", type=int, default=None, help="fail unless the model has this depth")
    p.add_argument("--version", type=int, choices=(1, 2), default=None, help="fail unless the model is this version")
    args = p.parse_args(argv)
    meta = convert(args.keras, args.output, args.depth, args.version)
    print(f"wrote {args.output}: ResNet-{meta['depth']} v{meta['version']} ({meta['parameters']:,} parameters) from "
          f"{args.keras}; outputs agree with Keras to {meta['keras_max_output_difference']:.1e}")
    return 0


def console() -> None:
    """The `distributed-resnet-convert` console script (the same as `python -m distributed_resnet.convert`)."""
    main_guard(main)


if __name__ == "__main__":
    console()
