"""What pqd may execute when it rebuilds something from files on disk.

A run folder's ``config.yaml`` may name its model by an import path
(``model.name: helpers:resnet18``). Building that model imports the module, which runs its
code; for a folder someone else sent, that is arbitrary code execution. Every path that
rebuilds a model from a folder on disk (``pqd.run.loader.load_int8_module``,
``pqd export``, ``pqd bench``, ``pqd predict``, resuming a run or a sweep from its saved
configs) passes the name through :func:`resolve_model_name` first: registered names
always pass; an import path passes only with ``allow_import=True``, which the caller sets
from an explicit ``allow_code=True`` argument or ``--allow-code`` flag. Running a config the
user passed on the command line (``pqd run my.yaml``) is the user's own choice and is
allowed there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pqd.config import is_external
from pqd.errors import ModelError, UntrustedCodeError

__all__ = ["is_import_path", "resolve_model_name", "check_config_code"]


def is_import_path(name: str) -> bool:
    """True for ``package.module:factory`` (anything with a colon); False for registry names and
    for ``torchvision:<name>`` / ``timm:<name>`` (architectures of installed libraries, built by name)."""
    return ":" in name and not is_external(name)


def resolve_model_name(name: Any, *, allow_import: bool, source: str | None = None) -> str:
    """``name`` if pqd may build it without running foreign code, else
    :class:`pqd.errors.UntrustedCodeError`. ``source`` names the file the name came from."""
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"{source or 'config'}: model.name must be a non-empty string, got {name!r}")
    if is_import_path(name) and not allow_import:
        module = name.partition(":")[0]
        where = source or "the saved config"
        raise UntrustedCodeError(
            f"{where} names the model {name!r}, an import path: rebuilding it would import module {module!r} "
            "and run its code, which pqd does not do for files read from disk. If you trust where this folder "
            "came from, pass allow_code=True (CLI: --allow-code), with the module importable."
        )
    return name


def check_config_code(config: Any, *, allow_code: bool, source: str | None = None) -> None:
    """Apply :func:`resolve_model_name` to a config (a ``RunConfig`` or its dict form) read
    from disk. The one place to extend when another config key gains an import path."""
    if isinstance(config, Mapping):
        model = config.get("model")
        name = model.get("name") if isinstance(model, Mapping) else None
        quant = config.get("quantize")
        leaves = (quant.get("leaf_modules") or ()) if isinstance(quant, Mapping) else ()
    else:
        name = config.model.name
        leaves = getattr(getattr(config, "quantize", None), "leaf_modules", ()) or ()
    if name is not None:  # None: the default model, a registered name
        resolve_model_name(name, allow_import=allow_code, source=source)
    for leaf in leaves:  # 'package.module:Class' entries import a class
        if isinstance(leaf, str) and is_import_path(leaf) and not allow_code:
            resolve_model_name(leaf, allow_import=False, source=f"{source or 'config'} (quantize.leaf_modules)")
