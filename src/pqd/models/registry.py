"""Model registry in the spirit of timm: ``@register_model`` + ``create_model(name, **kw)``.

Besides the registered names, ``create_model`` accepts ``torchvision:<name>`` and
``timm:<name>`` (architectures of those libraries, built by name with ``num_classes``;
:mod:`pqd.models.external`) and an import path ``package.module:factory`` for a user's own
``nn.Module`` factory.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from pqd.config import EXTERNAL_LIBRARIES as LIBRARIES
from pqd.errors import ModelError
from pqd.models.external import create_external

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def scaled_channels(channels: int, width: float) -> int:
    """A layer's channel count at width multiplier ``width`` (rounded, at least 8): the rule every built-in
    ResNet, VGG and WRN follows."""
    return max(8, int(round(channels * width)))


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its ``__name__``; it must accept ``num_classes`` and ``width``."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Registered names (the built-in architectures register when :mod:`pqd.models` is imported)."""
    return sorted(_MODELS)


def _resolve(name: str) -> Callable[..., nn.Module]:
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # ImportError, or any error raised by the module's own code while importing
            raise ModelError(
                f"cannot import module {module_name!r} for model {name!r}: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            factory: Callable[..., nn.Module] = getattr(module, attr)  # create_model checks what it builds
        except AttributeError:
            raise ModelError(f"module {module_name!r} has no attribute {attr!r} (model {name!r})") from None
        return factory
    names = list_models()
    if name not in _MODELS:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ModelError(
            f"unknown model {name!r}.{hint} Valid choices: {', '.join(names)}, "
            "or an import path 'package.module:factory'."
        )
    return _MODELS[name]


def create_model(name: str, *, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a model by registry name or ``package.module:factory`` import path.

    Keyword arguments (``width``, ``dropout``...) are passed to the factory; for a user
    factory only ``num_classes`` and explicitly given keywords are passed.
    """
    if name.partition(":")[0] in LIBRARIES:
        return create_external(name, num_classes=num_classes, **kwargs)
    factory = _resolve(name)
    try:
        model = factory(num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise ModelError(
            f"model {name!r} rejected its arguments {kwargs | {'num_classes': num_classes}}: {exc}"
        ) from exc
    except Exception as exc:  # a user factory's own failure: name the model rather than show a traceback
        raise ModelError(f"model factory {name!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
