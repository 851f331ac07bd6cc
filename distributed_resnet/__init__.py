"""distributed_resnet: ResNet on CIFAR-10, faithful to the Keras reference recipe, trained with Ray Train.

`TrainConfig`, `load_pretrained`, and (imported on first use, as they bring Ray) `fit` and `sweep`: see `api.py`.
"""

from .config import TrainConfig

__version__ = "0.1.0"
__all__ = ["TrainConfig", "fit", "load_pretrained", "sweep"]


def load_pretrained(checkpoint: str = "results/resnet20v1", device: str = "cpu"):
    """A trained model in eval mode, from any checkpoint folder or file (logits out; inputs N x 3 x 32 x 32 in [0, 1])."""
    from .evaluate import load_model

    return load_model(checkpoint, device)[0]


def __getattr__(name: str):
    if name in ("fit", "sweep"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'distributed_resnet' has no attribute {name!r}")
