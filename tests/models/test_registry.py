import sys
import types

import pytest
import torch
from torch import nn

from pqd.errors import ModelError
from pqd.models.registry import create_model, list_models


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("num_classes", [10, 100])
def test_registered_models_build_and_run(name, num_classes):
    model = create_model(name, num_classes=num_classes, width=0.125).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, num_classes)


# ResNet-18 and WRN-28-10 match the published CIFAR counts; VGG-16-BN is 4,224 below the
# common 14,728,266 because its convs carry no bias (BatchNorm follows each one).
@pytest.mark.parametrize(
    "name, params", [("resnet18", 11_173_962), ("vgg16_bn", 14_724_042), ("wrn_28_10", 36_479_194)]
)
def test_full_width_parameter_counts(name, params):
    model = create_model(name, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == params


# torchvision's published counts (1000 classes): the ImageNet-style models are its architectures, layer for layer
@pytest.mark.parametrize(
    "name, params",
    [("imagenet_resnet18", 11_689_512), ("imagenet_resnet50", 25_557_032), ("imagenet_mobilenet_v2", 3_504_872)],
)
def test_imagenet_models_match_torchvision_parameter_counts(name, params):
    model = create_model(name, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == params
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_resnet18_is_the_cifar_variant():
    m = create_model("resnet18")
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(x, nn.MaxPool2d) for x in m.modules())


def test_wrn_dropout_option():
    m = create_model("wrn_28_10", width=0.125, dropout=0.3)
    assert any(isinstance(x, nn.Dropout) and x.p == 0.3 for x in m.modules())


def test_user_model_by_import_path(monkeypatch):
    mod = types.ModuleType("user_models_for_test")
    mod.tiny = lambda num_classes: nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))
    monkeypatch.setitem(sys.modules, "user_models_for_test", mod)
    m = create_model("user_models_for_test:tiny", num_classes=7)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("resnet19", "Did you mean 'resnet18'"),
        ("no_such_pkg_x:f", "cannot import"),
        ("pqd.models.registry:nope", "no attribute"),
    ],
)
def test_model_errors(name, fragment):
    with pytest.raises(ModelError, match=fragment):
        create_model(name)
