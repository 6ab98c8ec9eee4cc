"""The one loader of finished runs: :func:`load_run` rebuilds config, data, teacher, final
student and deployed model from a run folder (:class:`pqd.run.rundir.RunDir` names its files);
:func:`load_int8_module` rebuilds the INT8 module from the compact ``.pqdz`` file; the timing
workers load an FP32 final student through :func:`student_model`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pqd.compress.qat import BACKEND
from pqd.compress.student import Student, convert_student
from pqd.data import load_data
from pqd.deploy.compact import load_compact, read_compact
from pqd.deploy.deployable import normalized_callable, read_torchscript_meta
from pqd.errors import CheckpointError
from pqd.run.config import RunConfig
from pqd.run.rundir import RunDir
from pqd.safety.trustpolicy import check_config_code
from pqd.stages.quantize import QuantizeConfig
from pqd.train.checkpoint import load_checkpoint

_IMAGE_SHAPES = {"digits": (3, 32, 32), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}


@dataclass
class LoadedRun:
    """A finished run, rebuilt: FP32 teacher, final student (fake-quant or FP32), deployed model."""

    run_dir: Path
    config: RunConfig
    data: Any  # pqd.data.Splits
    teacher: nn.Module
    student: Student
    deployed: Callable[[torch.Tensor], torch.Tensor]  # TorchScript INT8 or the FP32 student
    deployed_file: Path
    student_file: Path | None  # None for a dense run (the student is the teacher)

    @property
    def quantized(self) -> bool:
        return bool(self.student.quantized)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.data.image_shape


def load_run(run_dir: str | Path, *, data: Any = None, allow_code: bool = False) -> LoadedRun:
    """Rebuild a finished run (config.yaml, teacher, last stage's student, deployed file).

    The one function that rebuilds a run from disk: export, bench and the timing workers use it.
    A config naming a model by import path ('pkg.module:factory') is refused
    (:class:`pqd.errors.UntrustedCodeError`) unless ``allow_code``: loading a downloaded run
    folder never imports code from it.
    """
    self = RunDir(run_dir)
    config = self.read_config()
    check_config_code(config, allow_code=allow_code, source=str(self.config_path))
    last = len(config.stages) - 1
    student_file = self.student_path(last, config.stages[last].stage) if config.stages else None
    deployed_file = self.deployed_path(config)
    for need in (self.teacher_path, student_file, deployed_file):
        if need is not None and not need.is_file():
            shown = need.relative_to(self.path) if need.is_relative_to(self.path) else need
            raise CheckpointError(
                f"{self.path} is not a finished run: {shown} is missing; finish it with the same 'pqd run' command"
            )
    torch.backends.quantized.engine = BACKEND  # before any INT8 model is loaded
    data = data if data is not None else load_data(config.data, seed=config.seed)
    teacher = self.load_teacher(config, data.num_classes).eval()
    if config.stages:
        student = self.restore_student(config, last, num_classes=data.num_classes, image_shape=data.image_shape)
    else:
        student = Student(self.load_teacher(config, data.num_classes))
    student.model.eval()
    if deployed_file == self.int8_path:
        if not student.quantized:
            raise CheckpointError(f"{self.path}: the run quantizes but the last stage's student is not quantized")
        read_torchscript_meta(self.int8_path)  # a truncated zip: CheckpointError, not a raw torch error
        try:
            deployed = normalized_callable(torch.jit.load(str(self.int8_path), map_location="cpu"))
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/ValueError for damaged files
            raise CheckpointError(
                f"{self.int8_path} cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                "delete it and re-run the same 'pqd run' command to rewrite it"
            ) from None
    else:
        deployed = student.model
    return LoadedRun(self.path, config, data, teacher, student, deployed, deployed_file, student_file)


def run_facts(self: RunDir, meta: Mapping[str, Any] | None = None) -> tuple[int, tuple[int, ...]]:
    """num_classes and image shape of the run in ``self`` without loading data: ``meta`` (e.g. a compact file's), then
    metrics.json, then the teacher checkpoint's metadata, then the dataset's known shape."""
    facts = dict(meta or {})
    m = self.read_metrics()
    if m:
        facts = {**{k: m[k] for k in ("num_classes", "image_shape") if m.get(k)}, **facts}
    if not facts.get("num_classes") and self.teacher_path.is_file():
        facts["num_classes"] = load_checkpoint(self.teacher_path)[1].get("num_classes")
    if not facts.get("num_classes"):
        raise CheckpointError(
            f"{self.path}: cannot tell the number of classes (no compact meta, metrics.json or teacher metadata)"
        )
    shape = tuple(facts.get("image_shape") or ())
    if not shape:
        dataset = self.read_config().data.dataset
        if dataset not in _IMAGE_SHAPES:
            raise CheckpointError(
                f"{self.path}: cannot tell the image shape of dataset {dataset!r}; pass meta={{'image_shape': ...}}"
            )
        shape = _IMAGE_SHAPES[dataset]
    return int(facts["num_classes"]), shape


def int8_skeleton(self: RunDir, meta: Mapping[str, Any] | None = None, *, allow_code: bool = False) -> nn.Module:
    """A converted INT8 model of the run's architecture (untrained, uncalibrated), ready for
    :func:`pqd.deploy.compact.load_compact`. A model named by import path needs ``allow_code``."""
    config = self.read_config(allow_code=allow_code)
    if not config.quantizes:
        raise CheckpointError(f"{self.path}: no stage of the run quantizes, so it has no INT8 model")
    num_classes, shape = run_facts(self, meta)
    mode = config.section_as("quantize", QuantizeConfig).mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = self.rebuild_model(config, num_classes=num_classes, image_shape=shape, form=mode)
        return convert_student(Student(model, {}, mode)).eval()


def student_model(run_dir: str | Path, *, allow_code: bool = False) -> nn.Module:
    """The finished run's final student model, rebuilt by :meth:`RunDir.load` (what a timing
    worker loads for an FP32 final model)."""
    return load_run(run_dir, allow_code=allow_code).student.model


def load_int8_module(run_dir: str | Path, name: str | None = None, *, allow_code: bool = False) -> nn.Module:
    """The INT8 module of a finished run, rebuilt from its compact checkpoint (``name`` in the run
    directory; default ``model_int8.pqdz``). No pickle, and no code is imported from the run
    folder: a config.yaml naming a model by import path ('pkg.module:factory') raises
    :class:`pqd.errors.UntrustedCodeError` unless ``allow_code=True``."""
    run = RunDir(run_dir)
    run.read_config(allow_code=allow_code)  # the code check comes before any other error
    path = run.file(name) if name else run.compact_path
    _, meta = read_compact(path)
    return load_compact(path, int8_skeleton(run, meta, allow_code=allow_code))
