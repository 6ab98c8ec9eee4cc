"""Models: the registry (``register_model`` / ``create_model`` / ``list_models``) and the built-in
backbones (CIFAR-style, and ImageNet-style ones for 224x224 inputs), registered when this package is imported."""

from pqd.models import imagenet, resnet, vgg, wrn  # noqa: F401  (registers the built-in architectures)
from pqd.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
