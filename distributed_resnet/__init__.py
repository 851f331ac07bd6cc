"""distributed_resnet: ResNet on CIFAR-10, faithful to the Keras reference recipe, trained with Ray Train."""

__version__ = "0.1.0"
