"""distributed_resnet: ResNet on CIFAR-10, faithful to the Keras reference recipe, trained with Ray Train."""

__version__ = "0.1.0"


def load_pretrained(checkpoint: str = "results/resnet20v1", device: str = "cpu"):
    """A trained model in eval mode, from any checkpoint folder or file (logits out; inputs N x 3 x 32 x 32 in [0, 1])."""
    from .evaluate import load_model

    return load_model(checkpoint, device)[0]
