"""Models: the registry (``register_model`` / ``create_model`` / ``list_models``) and the built-in
CIFAR-style backbones, registered when this package is imported."""

from pqd.models import resnet, vgg, wrn  # noqa: F401  (registers the built-in architectures)
from pqd.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
