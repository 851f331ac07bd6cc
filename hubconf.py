"""torch.hub entry points: `torch.hub.load(REPO_DIR, "resnet20", pretrained="fast", source="local")`.

The models take float images N x 3 x 32 x 32, RGB, in [0, 1] (no normalisation) and return N x 10 logits.
"""

dependencies = ["torch", "numpy"]


def resnet20(pretrained: str | bool = "fast", device: str = "cpu"):
    """ResNet-20 v1 for CIFAR-10. `pretrained`: "fast" (the best shipped model, 90.79% test), "reference" (the
    Keras recipe's 200 epochs, 90.18%), a checkpoint path, or False for fresh He-normal weights (eval mode)."""
    if pretrained is False:
        from distributed_resnet.model import ResNet

        return ResNet(20, 1).to(device).eval()
    from distributed_resnet import load_pretrained

    return load_pretrained("fast" if pretrained is True else pretrained, device)
