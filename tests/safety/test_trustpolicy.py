"""Rebuilding a model from a folder on disk imports no code unless allowed."""

from __future__ import annotations

import sys

import pytest

from pqd.errors import ModelError, UntrustedCodeError
from pqd.run.config import load_config
from pqd.safety.trustpolicy import check_config_code, resolve_model_name


def test_downloaded_run_folder_with_helpers_module(downloaded_run):
    run, canary = downloaded_run
    config = load_config(run / "config.yaml")
    with pytest.raises(
        UntrustedCodeError,
        match=r"names the model 'helpers:resnet18', an import path.*allow_code=True \(CLI: --allow-code\)",
    ):
        check_config_code(config, allow_code=False, source=str(run / "config.yaml"))
    assert not canary.exists() and "helpers" not in sys.modules
    check_config_code(config, allow_code=True)  # allowed explicitly: passes (importing is the caller's next step)


def test_registered_names_always_pass():
    assert resolve_model_name("resnet18", allow_import=False) == "resnet18"
    assert resolve_model_name("pkg.mod:f", allow_import=True) == "pkg.mod:f"
    check_config_code({"stages": "P:1"}, allow_code=False)
    check_config_code({"model": {"name": "resnet18"}}, allow_code=False)
    with pytest.raises(UntrustedCodeError):
        check_config_code({"model": {"name": "os:system"}}, allow_code=False)
    with pytest.raises(ModelError, match="non-empty string"):
        resolve_model_name("", allow_import=True)
