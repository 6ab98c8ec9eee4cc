"""Built-in CIFAR-style backbones. Importing this package registers them."""

from pqd.models import resnet, vgg, wrn  # noqa: F401
