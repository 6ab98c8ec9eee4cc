"""The ordered pipeline: teacher → the run's stages, in order, from the stage registry → INT8
(or FP32) export → measure.

Every step leaves a file in the run directory (:class:`pqd.run.rundir.RunDir` owns the layout), so
re-running the same command after a kill resumes at the stage and epoch where it stopped. The
pipeline knows no stage by name: each entry of ``config.stages`` is looked up in
:mod:`pqd.stages.protocol` and run through the :class:`~pqd.stages.protocol.Stage` protocol.
An empty stage list is a dense run: the teacher alone, finalized and timed like any other run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pqd.compress.qat import float_modules
from pqd.compress.sparsity import DEFAULT_EXCLUDE, global_sparsity, prunable_layers
from pqd.compress.student import Student, convert_student
from pqd.data import TEST_SUBSET_SEED, Splits, load_data
from pqd.deploy.compact import save_compact, verify_compact
from pqd.deploy.deployable import deployable_torchscript, normalized_callable, save_torchscript
from pqd.errors import CheckpointError, ConfigError, DivergenceError, FrozenBranchWarning, ModelError
from pqd.measure import agreement, environment, file_bytes, measure_latency, predict, top1
from pqd.measure.degradation import compare_degradation
from pqd.measure.faithfulness import faithfulness
from pqd.measure.speedup import speedup_summary
from pqd.measure.stats import correct_vector, top1_record
from pqd.measure.workers import (
    WorkerError,
    start_workers,
    this_process_environment,
    thread_variables,
    worker_environment,
    workers_environment,
)
from pqd.run.config import RunConfig
from pqd.run.metrics import Accuracy, LatencyRecord, Metrics, Quantization, Sizes, Sparsity, StageRecord
from pqd.run.rundir import RunDir, build_model, model_kwargs, with_teacher_base
from pqd.stages.protocol import StageContext, get_stage
from pqd.train import train
from pqd.train.checkpoint import load_weights, save_checkpoint, state_dict_mismatch
from pqd.train.loop import default_device, masked_weight, process_rank
from pqd.train.tracking import make_tracker

log = logging.getLogger("pqd")

__all__ = [
    "build_model",
    "finalize",
    "init_distributed",
    "measure_run_latency",
    "model_kwargs",
    "preflight",
    "run_pipeline",
]


def measure_run_latency(
    config: RunConfig,
    data: Splits,
    *,
    teacher: nn.Module,
    teacher_path: Path,
    deployed: Callable[[torch.Tensor], torch.Tensor],
    deployed_path: Path,
    final_name: str,
) -> tuple[list[dict], dict]:
    """Teacher vs deployed model latency, each timed from its file in a worker process of its own;
    returns (latency records, the record of the threading environment they were timed in).

    The harness of ``pqd bench`` (:mod:`pqd.measure.workers`): a long training process is a
    poor place to time inference (its heap and thread pools are not a deployment's; figures in
    docs/BENCHMARKS.md, "How pqd times, and an independent check"). The workers start in the
    controlled threading environment (:func:`pqd.measure.workers.worker_environment`), or this
    process's own with ``measure.inherit_env``. If a worker cannot load the model (a user model
    not importable in a fresh interpreter, say), the models are timed in this process instead,
    under its own environment, with a warning; each record and the environment record say which.
    """
    from pqd.measure.latency import interleave

    m = config.measure
    base = {
        "input_shape": list(data.image_shape),
        "batch_sizes": list(m.batch_sizes),
        "seed": config.seed,
        "threads": m.threads,
    }
    eager = base | {
        "kind": "eager",
        "model": config.model.name,
        "kwargs": model_kwargs(config),
        "num_classes": data.num_classes,
    }
    specs = {
        "teacher_fp32": eager | {"weights": str(teacher_path)},
        final_name: (base | {"kind": "torchscript", "path": str(deployed_path)})
        if deployed_path.suffix == ".pt"
        else eager | {"weights": str(deployed_path)},
    }
    try:
        with start_workers(specs, inherit_env=m.inherit_env) as workers:
            env = workers_environment(workers)
            recs = interleave(
                workers,
                batch_sizes=tuple(m.batch_sizes),
                threads=m.threads,
                warmup=m.warmup,
                runs=m.runs,
                large_batch_runs=m.large_batch_runs,
            )
        return [r | {"harness": "worker processes"} for r in recs], env | {"harness": "worker processes"}
    except WorkerError as exc:
        log.warning("measure: timing in this process instead of worker processes (%s)", exc)
    recs = measure_latency(
        {"teacher_fp32": teacher, final_name: deployed},
        input_shape=data.image_shape,
        batch_sizes=m.batch_sizes,
        threads=m.threads,
        warmup=m.warmup,
        runs=m.runs,
        large_batch_runs=m.large_batch_runs,
        seed=config.seed,
    )
    return [r | {"harness": "in-process"} for r in recs], this_process_environment() | {"harness": "in-process"}


def preflight(config: RunConfig, data: Splits) -> None:
    """Fail in seconds rather than after hours of training: the model builds and maps a batch to
    ``num_classes`` logits, each stage's own checks pass (a stage may define
    ``preflight(model, config, example)``: prune.exclude matches layers, torch.fx traces the
    model, ...), and every training epoch gets at least one batch. Leaves the RNG untouched."""
    trains = (config.teacher.epochs > 0 and not config.teacher.weights) or any(s.epochs > 0 for s in config.stages)
    world = (
        torch.distributed.get_world_size()
        if torch.distributed.is_available() and torch.distributed.is_initialized()
        else 1
    )
    if trains and len(data.train) // world < config.train.batch_size:
        raise ConfigError(
            f"train.batch_size: {config.train.batch_size} is more than the {len(data.train)} training images"
            f"{f' split over {world} processes' if world > 1 else ''}, so no training step would run "
            "(incomplete batches are dropped); lower train.batch_size or use more data"
        )
    example = torch.zeros(2, *data.image_shape)
    with torch.random.fork_rng(devices=[]):
        model = build_model(config, data.num_classes)
        try:
            with torch.no_grad():
                y = model.eval()(example)
        except Exception as exc:
            raise ModelError(
                f"model {config.model.name!r} fails on a batch of {tuple(example.shape)} images: "
                f"{type(exc).__name__}: {str(exc)[:300]}"
            ) from None
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != (2, data.num_classes):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ModelError(
                f"model {config.model.name!r} returns {got} for a batch of 2 images; expected logits of shape "
                f"(2, {data.num_classes}) for the {data.num_classes} classes of {data.name}"
            )
        checked = set()
        for spec in config.stages:
            stage = get_stage(spec.stage)
            if stage.name not in checked:
                checked.add(stage.name)
                stage.preflight(model, config, example)


def _teacher(config: RunConfig, data: Splits, run: RunDir, device: torch.device, tracker=None) -> nn.Module:
    """The dense FP32 teacher: loaded from the run, loaded from ``teacher.weights``, or trained (resumably)."""
    if run.teacher_path.exists():
        model = run.load_teacher(config, data.num_classes, device)
        log.info("teacher: loaded %s", run.teacher_path)
        if config.stages:  # the same check as after training: a resumed run records the same warnings
            _note(_check_teacher(config, data, model))
        return model
    model = build_model(config, data.num_classes).to(device)
    if config.teacher.weights:
        state = load_weights(config.teacher.weights)
        head = f"{prunable_layers(model)[-1]}.weight"  # the classifier: the last conv/linear layer
        if head in state and state[head].shape[:1] != model.get_parameter(head).shape[:1]:
            shown = ", ".join(data.train.classes[:8]) + (", ..." if data.num_classes > 8 else "")
            raise CheckpointError(
                f"teacher.weights {config.teacher.weights!r} has {state[head].shape[0]} outputs at {head!r}, but dataset "
                f"{data.name} has {data.num_classes} classes ({shown}); give weights trained on these classes, or leave "
                "teacher.weights unset to train the teacher"
            )
        mismatch = state_dict_mismatch(model, state)
        if mismatch:
            raise CheckpointError(
                f"teacher.weights {config.teacher.weights!r} does not fit model {config.model.name!r} "
                f"with {data.num_classes} classes: {mismatch}. Give weights saved from this architecture "
                "(model.name, model.width) as a state_dict"
            )
        model.load_state_dict(state)
    else:
        train(
            model,
            data,
            epochs=config.teacher.epochs,
            lr=config.teacher.lr,
            config=config.train,
            checkpoint=run.teacher_epoch_path,
            seed=config.seed,
            tag="teacher",
            lr_key="teacher.lr",
            amp=True,
            augment=config.data.augment,
            tracker=tracker,
        )
    if config.stages:  # before the save: a diverged teacher is not worth resuming from
        try:
            warning = _check_teacher(config, data, model)
        except DivergenceError:
            if process_rank() == 0:
                run.teacher_epoch_path.unlink(missing_ok=True)
            raise
        _note(warning)
    if process_rank() == 0:
        run.save_teacher(model, model_name=config.model.name, num_classes=data.num_classes)
    _barrier()
    return model


_WARNINGS: list[str] = []  # warnings of the current run, for metrics.json


def _note(warning: str | None) -> None:
    if warning:
        log.warning("%s", warning)
        _WARNINGS.append(warning)


def _check_teacher(config: RunConfig, data: Splits, teacher: nn.Module) -> str | None:
    """Flag a teacher at chance level before compression is spent on it: on the validation split
    (or a slice of the training split; never the test split). NaN/inf weights are an error; a
    teacher at chance level is a warning (tiny smoke-test teachers are near chance on purpose)."""
    from pqd.train.guard import check_teacher_quality, first_nonfinite

    bad = first_nonfinite(teacher)
    if bad is not None:
        raise DivergenceError(
            f"teacher: {bad!r} holds NaN/inf values; lower teacher.lr (--set teacher.lr=...) or check "
            "teacher.weights, then re-run"
        )
    n = len(data.train)
    ds = (  # a seeded sample of the training split: an image folder's training split is sorted by class
        data.val
        if data.val is not None and len(data.val)
        else data.train.subset(
            torch.randperm(n, generator=torch.Generator().manual_seed(0))[: min(2000, n)].sort().values
        )
    )
    was = teacher.training
    logits = predict(teacher, ds, mean=data.mean, std=data.std, batch_size=config.train.eval_batch_size)
    teacher.train(was)
    return check_teacher_quality(
        top1(logits, ds.y),
        data.num_classes,
        where="teacher",
        strict=False,
        pred_counts=torch.bincount(logits.argmax(1).cpu(), minlength=data.num_classes),
        label_counts=torch.bincount(torch.as_tensor(ds.y).cpu(), minlength=data.num_classes),
    )


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def init_distributed() -> None:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPUs."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _on_device(student: Student, device: torch.device) -> Student:
    student.model.to(device)
    student.masks = {k: v.to(device) for k, v in student.masks.items()}
    return student


def run_pipeline(
    config: RunConfig,
    out_dir: str | Path,
    *,
    device: torch.device | str | None = None,
    teacher_base: str | Path | None = None,
) -> dict:
    """Run (or resume) a whole compression run into ``out_dir``; return the metrics (as a dict).

    ``device``: where teacher and student train (default: CUDA if available, else CPU); every
    stage's output is kept there. Under ``torchrun`` every rank trains (DistributedDataParallel)
    and rank 0 alone writes files and measures; the other ranks return an empty dict.

    The folder is claimed first (:meth:`RunDir.claim`: a folder holding files pqd did not write is
    refused, and a second process writing the same folder is refused). ``teacher_base``: the
    folder a relative ``teacher.weights`` is resolved against (a sweep's folder; default: the
    current directory).
    """
    run = RunDir(out_dir)
    with run.claim():
        return _run_pipeline(config, run, device=device, teacher_base=teacher_base)


def _run_pipeline(config: RunConfig, run: RunDir, *, device, teacher_base) -> dict:
    t_start = time.perf_counter()
    main = process_rank() == 0
    if main:
        run.check_config(config, teacher_base=teacher_base)
    _barrier()
    config = with_teacher_base(config, teacher_base)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.seed)
    device = torch.device(device) if device is not None else default_device()
    if main:
        # this process's threading variables, and those the latency workers will get (updated once they ran)
        run.write_env(
            environment(config.measure.threads)
            | {
                "train_threads": torch.get_num_threads(),
                "thread_env": thread_variables(os.environ),
                "latency_env": worker_environment(
                    config.measure.threads, inherit_env=config.measure.inherit_env
                ).record(),
            }
        )

    data = load_data(config.data, seed=config.seed)
    log.info(
        "data: %s, %d train / %d test images, %d classes", data.name, len(data.train), len(data.test), data.num_classes
    )
    preflight(config, data)
    tracker = make_tracker(config.train.tracker, config.train.tracker_dir or run.file(run.TRACKER)) if main else None
    try:
        return _run_stages(config, data, run, device, tracker, t_start)
    finally:
        if tracker is not None:
            tracker.close()


def _run_stages(config: RunConfig, data: Splits, run: RunDir, device: torch.device, tracker, t_start: float) -> dict:
    main = process_rank() == 0
    _WARNINGS.clear()
    teacher = _teacher(config, data, run, device, tracker)

    last = run.last_finished_stage(config)
    if last >= 0:
        student = run.restore_student(
            config, last, num_classes=data.num_classes, image_shape=data.image_shape, device=device
        )
        log.info("resuming after stage %d (%s)", last + 1, config.stages[last].stage)
    else:
        student = Student(build_model(config, data.num_classes).to(device))
        student.model.load_state_dict(teacher.state_dict())

    ctx = StageContext(
        data=data,
        teacher=teacher,
        config=config,
        train_config=config.train,
        seed=config.seed,
        augment=config.data.augment,
        device=device,
        tracker=tracker,
    )
    times: dict[int, float] = {}
    for i in range(last + 1, len(config.stages)):
        spec = config.stages[i]
        stage = get_stage(spec.stage)
        log.info("stage %d/%d: %s for %d epochs", i + 1, len(config.stages), stage.name, spec.epochs)
        t0 = time.perf_counter()
        student = _on_device(
            stage.run(
                student,
                config.section(stage.section),
                dataclasses.replace(ctx, index=i),
                epochs=spec.epochs,
                checkpoint=run.stage_epoch_path(i, stage.name),
            ),
            device,
        )
        times[i] = round(time.perf_counter() - t0, 2)
        if main:
            run.save_student(i, stage.name, student)
        _barrier()

    if not main:
        return {}
    for rec in (getattr(student, "records", None) or {}).values():  # what the stages recorded, a resumed run's too
        for warning in (rec.get("warnings") or []) if isinstance(rec, dict) else []:
            if warning not in _WARNINGS:
                _WARNINGS.append(warning)
    metrics = finalize(config, data, teacher, student, run, stage_times=times)
    metrics.wall_time_s = round(time.perf_counter() - t_start, 2)
    metrics.extra["preprocessing"] = _deploy_meta(config, data, normalization="inside")
    if _WARNINGS:
        metrics.extra["warnings"] = list(_WARNINGS)
    tracker.log_metrics({"final": metrics.to_dict()})
    # keep what other commands added (e.g. `pqd bench`) when a finished run is re-measured
    return run.write_metrics(metrics)


def _stage_records(config: RunConfig, student: Student, stage_times: dict[int, float]) -> list[StageRecord]:
    records = getattr(student, "records", None) or {}
    out = []
    for i, spec in enumerate(config.stages):
        stage = get_stage(spec.stage)
        label = f"{i + 1}_{stage.name}"
        rec = dict(records.get(label) or records.get(stage.name) or {})
        out.append(
            StageRecord(
                index=i,
                stage=stage.name,
                letter=stage.letter,
                epochs=spec.epochs,
                quantizes=stage.quantizes,
                structural=stage.structural,
                records=rec,
                wall_time_s=stage_times.get(i),
            )
        )
    return out


def finalize(
    config: RunConfig,
    data: Splits,
    teacher: nn.Module,
    student: Student,
    run: RunDir,
    *,
    stage_times: dict[int, float] | None = None,
) -> Metrics:
    """Export the deployable model, then measure accuracy, sparsity, size and latency.

    Works on CPU copies: the live teacher and student stay on their device.
    """
    teacher = copy.deepcopy(teacher).cpu().eval()
    final = Student(
        copy.deepcopy(student.model).cpu().eval(),
        {k: v.cpu() for k, v in student.masks.items()},
        student.form,
        student.freeze_fraction,
    )
    mean, std, ebs = data.mean, data.std, config.train.eval_batch_size
    # Convert before evaluating: a PTQ student's observers have no off switch, so running it on
    # the test set first would re-calibrate it on test data (and a resumed run would differ).
    int8 = convert_student(final) if final.quantized else None
    t_logits = predict(teacher, data.test, mean=mean, std=std, batch_size=ebs)
    s_logits = predict(final.model, data.test, mean=mean, std=std, batch_size=ebs)
    quantization = None
    compact: dict = {}
    extra_acc: dict = {}
    if int8 is not None:
        deployed_path = run.deployed_path(config)
        # self-contained deployable: takes raw images (normalisation inside), carries pqd.json and class names
        with warnings.catch_warnings(record=True) as caught:  # control flow frozen by tracing: into metrics.json
            warnings.simplefilter("always", FrozenBranchWarning)
            scripted = deployable_torchscript(
                int8, mean=mean, std=std, class_names=data.test.classes, input_shape=data.image_shape
            )
        for w in caught:
            if issubclass(w.category, FrozenBranchWarning):
                _note(f"export: {w.message}")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        save_torchscript(scripted, deployed_path, meta=_deploy_meta(config, data, form="int8"), overwrite=True)
        deployed = normalized_callable(
            torch.jit.load(str(deployed_path), map_location="cpu")
        )  # bare model: same logits
        d_logits = predict(deployed, data.test, mean=mean, std=std, batch_size=ebs)
        if final.form == "qat":
            extra_acc = {
                "fake_quant_top1": top1(s_logits, data.test.y),
                "int8_vs_fake_quant_agreement": agreement(d_logits, s_logits),
            }
        else:  # PTQ: the pre-conversion model is the calibrated FP32 model, not a fake-quant one
            extra_acc = {
                "pre_conversion_fp32_top1": top1(s_logits, data.test.y),
                "int8_vs_fp32_agreement": agreement(d_logits, s_logits),
            }
        final_name, measured = "final_int8", int8_sparsity(int8, final)
        save_compact(
            int8,
            run.compact_path,
            meta={
                "model": config.model.name,
                "width": config.model.width,
                "num_classes": data.num_classes,
                "image_shape": list(data.image_shape),
                "quantize_mode": final.form,
                "dataset": data.name,
                "mean": list(data.mean),
                "std": list(data.std),
                "class_names": [str(c) for c in data.test.classes],
                **({"preprocess": data.preprocess} if data.preprocess else {}),
            },
        )
        verify_compact(run.compact_path, int8)  # decodes it and compares bit for bit
        compact = {"compact_int8": file_bytes(run.compact_path), "compact_file": run.compact_path.name}
        quantization = Quantization(backend="x86", float_modules=float_modules(int8))
        if quantization.float_modules:
            log.warning(
                "quantize: %d operation(s) stay FP32 in the INT8 model (no x86 integer kernel; dequantized around): %s",
                len(quantization.float_modules),
                ", ".join(f"{f['name']} ({f['type']})" for f in quantization.float_modules),
            )
    else:
        deployed_path = run.deployed_path(config)
        if deployed_path != run.teacher_path:  # a dense run deploys the teacher's own file
            save_checkpoint(deployed_path, final.model.state_dict(), {"form": "fp32"})
        deployed, d_logits, final_name = final.model, s_logits, "final_fp32"
        measured = None
    accuracy = Accuracy(
        teacher_top1=top1(t_logits, data.test.y),
        final_top1=top1(d_logits, data.test.y),
        final_vs_teacher_agreement=agreement(d_logits, t_logits),
        **extra_acc,
        **_accuracy_evidence(
            config,
            data,
            run,
            t_logits=t_logits,
            d_logits=d_logits,
            s_logits=s_logits,
            form=final.form if int8 is not None else None,
        ),
    )

    # what the run's pruning stages declare: target sparsity, criterion, layers left dense
    pruning = [(stage, config.section(stage.section)) for stage in (get_stage(s.stage) for s in config.stages)]
    targets = [t for stage, section in pruning if (t := stage.target_sparsity(section)) is not None]
    criteria = [c for stage, section in pruning if (c := stage.prune_criterion(section)) is not None]
    excludes = [e for stage, section in pruning if (e := stage.prune_exclude(section)) is not None]
    layers = list(final.masks) or prunable_layers(final.model, excludes[0] if excludes else DEFAULT_EXCLUDE)
    target = max(targets, default=0.0)
    sparsity = Sparsity(
        target=target,
        achieved=global_sparsity(final.model, layers),
        achieved_int8=measured,
        prunable_layers=len(layers),
    )
    lat, lat_env = measure_run_latency(
        config,
        data,
        teacher=teacher,
        teacher_path=run.teacher_path,
        deployed=deployed,
        deployed_path=deployed_path,
        final_name=final_name,
    )
    _record_latency_env(run, lat_env)
    lat = [
        r
        | {
            "runtime": "pytorch",
            "precision": "fp32" if r["model"].endswith("fp32") else "int8",
            "form": "eager" if r["model"].endswith("fp32") else "TorchScript",
        }
        for r in lat
    ]
    epochs = {"teacher": 0 if config.teacher.weights else config.teacher.epochs}
    for s in config.stages:
        epochs[s.stage] = epochs.get(s.stage, 0) + s.epochs
    return Metrics(
        model=config.model.name,
        width=config.model.width,
        dataset=data.name,
        num_classes=data.num_classes,
        stages=config.stage_string(),
        stage_order=[s.stage for s in config.stages],
        epochs=epochs,
        teacher_source=f"weights:{config.teacher.weights}" if config.teacher.weights else "trained",
        final_form="int8" if final.quantized else "fp32",
        accuracy=accuracy,
        sparsity=sparsity,
        size_bytes=Sizes(
            teacher_fp32=file_bytes(run.teacher_path),
            final=file_bytes(deployed_path),
            final_file=deployed_path.name,
            **compact,
        ),
        latency=[LatencyRecord.from_dict(r) for r in lat],
        pruned=bool(final.masks),
        quantize_mode=final.form if final.quantized else None,
        prune_criterion=next((c for c in criteria if c != "magnitude"), criteria[0] if criteria else None),
        image_shape=list(data.image_shape),
        quantization=quantization,
        faithfulness=faithfulness(t_logits, d_logits, data.test.y, class_names=data.test.classes),
        stage_records=_stage_records(config, student, stage_times or {}),
        degradation=compare_degradation(t_logits, d_logits, data.test.y),
        speedup=speedup_summary(lat),
        latency_env=lat_env,
    )


def _record_latency_env(run: RunDir, record: dict) -> None:
    """Put the environment the latency was measured in into env.json (written at the run's start)."""
    try:
        env = json.loads(run.env_path.read_text())
    except (OSError, ValueError):
        env = None
    if isinstance(env, dict):
        run.write_env(env | {"latency_env": record})


def _accuracy_evidence(
    config: RunConfig,
    data: Splits,
    run: RunDir,
    *,
    t_logits: torch.Tensor,
    d_logits: torch.Tensor,
    s_logits: torch.Tensor,
    form: str | None,
) -> dict:
    """Wilson intervals beside every top-1, which test images were used, and the prediction files
    (teacher and deployed model, int16 argmax in test-split order) for paired tests between runs."""
    y = data.test.y.cpu().numpy()
    out: dict = {
        "teacher_top1_ci": top1_record(correct_vector(t_logits.numpy(), y)),
        "final_top1_ci": top1_record(correct_vector(d_logits.numpy(), y)),
        "test_n": int(len(y)),
        "test_full_split": config.data.test_subset is None,
        "test_subset_seed": None if config.data.test_subset is None else TEST_SUBSET_SEED,
    }
    if form == "qat":
        out["fake_quant_top1_ci"] = top1_record(correct_vector(s_logits.numpy(), y))
    elif form is not None:
        out["pre_conversion_fp32_top1_ci"] = top1_record(correct_vector(s_logits.numpy(), y))
    out["predictions_file"] = run.save_predictions(d_logits.argmax(1).numpy()).name
    out["teacher_predictions_file"] = run.save_predictions(t_logits.argmax(1).numpy(), teacher=True).name
    run.save_predictions(y, labels=True)
    return out


def _deploy_meta(config: RunConfig, data: Splits, *, form: str | None = None, normalization: str = "inside") -> dict:
    """The preprocessing record a deployable carries (pqd.deploy.deployable.deployable_meta)."""
    from pqd.deploy.deployable import deployable_meta

    extra = {"model": config.model.name, "stages": config.stage_string()} | ({"form": form} if form else {})
    return deployable_meta(
        mean=data.mean,
        std=data.std,
        class_names=data.test.classes,
        input_shape=data.image_shape,
        normalization=normalization,
        extra=extra,
        preprocess=data.preprocess,
    )


def int8_sparsity(int8: nn.Module, student: Student) -> float | None:
    """Fraction of exactly-zero int8 values at the masked layers of the converted model."""
    zeros = total = 0
    for path in student.masks:
        mod = int8.get_submodule(path)
        weight = getattr(mod, "weight", None)
        w = weight() if callable(weight) else masked_weight(int8, path).detach()  # a layer left FP32
        q = w.int_repr() if w.is_quantized else w
        zeros += int((q == 0).sum())
        total += q.numel()
    return zeros / total if total else None
