"""The ordered pipeline: teacher → any order of {prune, quantize, distill} → INT8 → measure.

Every step leaves a file in RUN_DIR, so re-running the same command after a kill resumes
at the stage and epoch where it stopped:

    RUN_DIR/config.yaml                 resolved config (a different config is refused)
    RUN_DIR/env.json                    CPU, flags, threads, versions, git commit
    RUN_DIR/teacher.safetensors         dense FP32 teacher weights (also the size baseline)
    RUN_DIR/stages/N_<stage>/epoch.safetensors    last finished epoch of a running stage
    RUN_DIR/stages/N_<stage>/student.safetensors  the stage's output (weights + masks)
    RUN_DIR/model_int8.pt               final deployable model (TorchScript, frozen, INT8)
    RUN_DIR/model_int8.pqdz             the same INT8 weights, compact sparse format (pqd.compact)
      or model_fp32.safetensors         when the pipeline has no quantize stage
    RUN_DIR/metrics.json                accuracy, sparsity, bytes on disk, latency
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from pqd.compact import FILE_NAME as COMPACT_FILE, save_compact, verify_compact
from pqd.config import RunConfig
from pqd.data import Splits, load_data
from pqd.errors import CheckpointError, ConfigError, ModelError
from pqd.measure import agreement, environment, file_bytes, measure_latency, predict, top1
from pqd.measure.faithfulness import faithfulness
from pqd.registry import create_model
from pqd.stages import Student, convert, distill, global_sparsity, prepare, prunable_layers, prune, quantize, to_torchscript
from pqd.stages.quantize import float_modules, freeze
from pqd.train import load_checkpoint, save_checkpoint, train
from pqd.train.checkpoint import atomic_write_bytes, load_weights
from pqd.train.loop import default_device, masked_weight

log = logging.getLogger("pqd")
METRICS_SCHEMA = 1


def model_kwargs(config: RunConfig) -> dict[str, Any]:
    """The keyword arguments ``create_model`` gets for this run's model (beyond num_classes)."""
    kw: dict[str, Any] = {}
    if config.model.width != 1.0:
        kw["width"] = config.model.width
    if config.model.dropout:
        kw["dropout"] = config.model.dropout
    return kw


def build_model(config: RunConfig, num_classes: int) -> nn.Module:
    return create_model(config.model.name, num_classes=num_classes, **model_kwargs(config))


def measure_run_latency(config: RunConfig, data: Splits, *, teacher: nn.Module, teacher_path: Path, deployed: nn.Module,
                        deployed_path: Path, final_name: str) -> list[dict]:
    """Teacher vs deployed model latency, each timed from its file in a worker process of its own.

    The harness of ``pqd bench`` (:mod:`pqd.measure.workers`): a long training process is a
    poor place to time inference (its heap and thread pools are not a deployment's; the
    demo's INT8 model timed 0.60 ms there against 0.27 ms in a fresh process). If a worker
    cannot load the model (a user model not importable in a fresh interpreter, say), the
    models are timed in this process instead, with a warning; each record says which.
    """
    from pqd.measure.latency import interleave
    from pqd.measure.workers import WorkerError, start_workers

    m = config.measure
    base = {"input_shape": list(data.image_shape), "batch_sizes": list(m.batch_sizes), "seed": config.seed, "threads": m.threads}
    eager = base | {"kind": "eager", "model": config.model.name, "kwargs": model_kwargs(config), "num_classes": data.num_classes}
    specs = {"teacher_fp32": eager | {"weights": str(teacher_path)},
             final_name: (base | {"kind": "torchscript", "path": str(deployed_path)}) if deployed_path.suffix == ".pt"
             else eager | {"weights": str(deployed_path)}}
    try:
        with start_workers(specs) as workers:
            recs = interleave(workers, batch_sizes=tuple(m.batch_sizes), threads=m.threads, warmup=m.warmup, runs=m.runs,
                              large_batch_runs=m.large_batch_runs)
        return [r | {"harness": "worker processes"} for r in recs]
    except WorkerError as exc:
        log.warning("measure: timing in this process instead of worker processes (%s)", exc)
    recs = measure_latency({"teacher_fp32": teacher, final_name: deployed}, input_shape=data.image_shape, batch_sizes=m.batch_sizes,
                           threads=m.threads, warmup=m.warmup, runs=m.runs, large_batch_runs=m.large_batch_runs, seed=config.seed)
    return [r | {"harness": "in-process"} for r in recs]


def _check_run_dir(out: Path, config: RunConfig) -> None:
    saved = out / "config.yaml"
    want = config.to_dict()
    if saved.exists():
        try:
            have = yaml.safe_load(saved.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{saved} cannot be read ({exc}); restore it or choose a new --out directory") from None
        if have != want and not _has_results(out):
            # an earlier attempt stopped before computing anything (e.g. on a config or data
            # error): there is nothing to resume, so the corrected config takes over
            log.info("%s holds no results yet; replacing its config.yaml", out)
            atomic_write_bytes(saved, yaml.safe_dump(want, sort_keys=False).encode())
        elif have != want:
            diff = sorted(_diff_keys(have, want))
            raise ConfigError(
                f"{out} holds a run with a different config (differs at: {', '.join(diff) or '?'}); "
                "re-run with the same config to resume, or choose a new --out directory"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(saved, yaml.safe_dump(want, sort_keys=False).encode())


def _has_results(out: Path) -> bool:
    return any((out / name).exists() for name in ("teacher.safetensors", "teacher.epoch.safetensors", "stages", "metrics.json"))


def preflight(config: RunConfig, data: Splits) -> None:
    """Fail in seconds rather than after hours of training: the model builds and maps a batch to
    ``num_classes`` logits, prune.exclude matches its layers, torch.fx can trace it for the
    quantize stage, and every training epoch gets at least one batch. Leaves the RNG untouched."""
    trains = (config.teacher.epochs > 0 and not config.teacher.weights) or any(s.epochs > 0 for s in config.stages)
    world = torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
    if trains and len(data.train) // world < config.train.batch_size:
        raise ConfigError(
            f"train.batch_size: {config.train.batch_size} is more than the {len(data.train)} training images"
            f"{f' split over {world} processes' if world > 1 else ''}, so no training step would run "
            "(incomplete batches are dropped); lower train.batch_size or use more data"
        )
    names = [s.stage for s in config.stages]
    example = torch.zeros(2, *data.image_shape)
    with torch.random.fork_rng(devices=[]):
        model = build_model(config, data.num_classes)
        try:
            with torch.no_grad():
                y = model.eval()(example)
        except Exception as exc:
            raise ModelError(f"model {config.model.name!r} fails on a batch of {tuple(example.shape)} images: "
                             f"{type(exc).__name__}: {str(exc)[:300]}") from None
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != (2, data.num_classes):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ModelError(f"model {config.model.name!r} returns {got} for a batch of 2 images; expected logits of shape "
                             f"(2, {data.num_classes}) for the {data.num_classes} classes of {data.name}")
        if "prune" in names:
            prunable_layers(model, config.prune.exclude)
        if "quantize" in names:
            prepare(model, example, mode=config.quantize.mode, reduce_range=config.quantize.reduce_range)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _teacher(config: RunConfig, data: Splits, out: Path, device: torch.device) -> tuple[nn.Module, Path]:
    model = build_model(config, data.num_classes).to(device)
    path = out / "teacher.safetensors"
    if path.exists():
        tensors, _ = load_checkpoint(path)
        model.load_state_dict(tensors)
        log.info("teacher: loaded %s", path)
        return model, path
    if config.teacher.weights:
        state = load_weights(config.teacher.weights)
        head = f"{prunable_layers(model)[-1]}.weight"  # the classifier: the last conv/linear layer
        if head in state and state[head].shape[:1] != model.get_submodule(head[:-7]).weight.shape[:1]:
            shown = ", ".join(data.train.classes[:8]) + (", ..." if data.num_classes > 8 else "")
            raise CheckpointError(
                f"teacher.weights {config.teacher.weights!r} has {state[head].shape[0]} outputs at {head!r}, but dataset "
                f"{data.name} has {data.num_classes} classes ({shown}); give weights trained on these classes, or leave "
                "teacher.weights unset to train the teacher")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"teacher.weights {config.teacher.weights!r} does not fit model {config.model.name!r} "
                                  f"with {data.num_classes} classes: {str(exc)[:400]}") from None
    else:
        train(model, data, epochs=config.teacher.epochs, lr=config.teacher.lr, config=config.train,
              checkpoint=out / "teacher.epoch.safetensors", seed=config.seed, tag="teacher", amp=True, augment=config.data.augment)
    if _rank() == 0:
        save_checkpoint(path, model.state_dict(), {"model": config.model.name, "num_classes": data.num_classes})
        (out / "teacher.epoch.safetensors").unlink(missing_ok=True)
    _barrier()
    return model, path


def _stage_dir(out: Path, i: int, name: str) -> Path:
    return out / "stages" / f"{i + 1}_{name}"


def _restore_student(config: RunConfig, data: Splits, upto: int, out: Path, device: torch.device) -> Student:
    """Rebuild the student as it was after stage ``upto`` from that stage's output file."""
    names = [s.stage for s in config.stages[: upto + 1]]
    model = build_model(config, data.num_classes)
    form = "fp32"
    if "quantize" in names:
        form = config.quantize.mode
        model = prepare(model, torch.zeros(2, *data.image_shape), mode=form, reduce_range=config.quantize.reduce_range)
    tensors, _ = load_checkpoint(_stage_dir(out, upto, names[-1]) / "student.safetensors")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    masks = {k[5:]: v.to(device) for k, v in tensors.items() if k.startswith("mask.")}
    if form == "qat":
        freeze(model)  # every stage ends frozen; BN freezing is module state, not in the state_dict
    return Student(model.to(device), masks, form, config.quantize.freeze_fraction)


def _save_student(path: Path, student: Student) -> None:
    tensors = {f"model.{k}": v for k, v in student.model.state_dict().items()}
    tensors.update({f"mask.{k}": v for k, v in student.masks.items()})
    save_checkpoint(path, tensors, {"form": student.form})


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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


def run_pipeline(config: RunConfig, out_dir: str | Path) -> dict:
    """Run (or resume) a whole compression run into ``out_dir``; return the metrics.

    Under ``torchrun`` every rank trains (DistributedDataParallel) and rank 0 alone writes
    files and measures; the other ranks return an empty dict.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    main = _rank() == 0
    if main:
        _check_run_dir(out, config)
    _barrier()
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.seed)
    device = default_device()
    if main:
        atomic_write_bytes(out / "env.json", json.dumps(environment(config.measure.threads), indent=2).encode())

    data = load_data(config.data, seed=config.seed)
    log.info("data: %s, %d train / %d test images, %d classes", data.name, len(data.train), len(data.test), data.num_classes)
    preflight(config, data)
    teacher, teacher_path = _teacher(config, data, out, device)

    done = [i for i, s in enumerate(config.stages) if (_stage_dir(out, i, s.stage) / "student.safetensors").exists()]
    first = 0
    if done:
        first = max(done) + 1
        student = _restore_student(config, data, max(done), out, device)
        log.info("resuming after stage %d (%s)", first, config.stages[first - 1].stage)
    else:
        student = Student(build_model(config, data.num_classes).to(device))
        student.model.load_state_dict(teacher.state_dict())

    common = dict(data=data, train_config=config.train, seed=config.seed, augment=config.data.augment)
    for i in range(first, len(config.stages)):
        spec = config.stages[i]
        sdir = _stage_dir(out, i, spec.stage)
        ckpt = sdir / "epoch.safetensors"
        log.info("stage %d/%d: %s for %d epochs", i + 1, len(config.stages), spec.stage, spec.epochs)
        if spec.stage == "prune":
            student = prune(student, config.prune, epochs=spec.epochs, checkpoint=ckpt, **common)
        elif spec.stage == "quantize":
            student = quantize(student, config.quantize, epochs=spec.epochs, checkpoint=ckpt, **common)
            student.model.to(device)
        else:
            student = distill(student, config.distill, teacher=teacher, epochs=spec.epochs, checkpoint=ckpt, **common)
        if main:
            _save_student(sdir / "student.safetensors", student)
            ckpt.unlink(missing_ok=True)
        _barrier()

    if not main:
        return {}
    metrics = finalize(config, data, teacher, teacher_path, student, out)
    metrics["wall_time_s"] = round(time.perf_counter() - t_start, 2)
    old = out / "metrics.json"
    if old.exists():  # keep what other commands added (e.g. `pqd bench`) when a finished run is re-measured
        try:
            previous = json.loads(old.read_text())
        except (OSError, ValueError):
            previous = {}
        metrics.update({k: v for k, v in previous.items() if k not in metrics})
    atomic_write_bytes(old, json.dumps(metrics, indent=2).encode())
    return metrics


def finalize(config: RunConfig, data: Splits, teacher: nn.Module, teacher_path: Path, student: Student, out: Path) -> dict:
    """Export the deployable model, then measure accuracy, sparsity, size and latency."""
    teacher = teacher.cpu().eval()
    student.model.cpu().eval()
    mean, std, ebs = data.mean, data.std, config.train.eval_batch_size
    example = torch.zeros(1, *data.image_shape)
    # Convert before evaluating: a PTQ student's observers have no off switch, so running it on
    # the test set first would re-calibrate it on test data (and a resumed run would differ).
    int8 = convert(student) if student.quantized else None
    t_logits = predict(teacher, data.test, mean=mean, std=std, batch_size=ebs)
    s_logits = predict(student.model, data.test, mean=mean, std=std, batch_size=ebs)
    acc: dict[str, float] = {"teacher_top1": top1(t_logits, data.test.y)}
    quantization = None
    compact_sizes: dict[str, Any] = {}
    if int8 is not None:
        deployed_path = out / "model_int8.pt"
        scripted = to_torchscript(int8, example)
        buf = _jit_bytes(scripted)
        atomic_write_bytes(deployed_path, buf)
        deployed = torch.jit.load(str(deployed_path), map_location="cpu")
        d_logits = predict(deployed, data.test, mean=mean, std=std, batch_size=ebs)
        if student.form == "qat":
            acc["fake_quant_top1"] = top1(s_logits, data.test.y)
            acc["int8_vs_fake_quant_agreement"] = agreement(d_logits, s_logits)
        else:  # PTQ: the pre-conversion model is the calibrated FP32 model, not a fake-quant one
            acc["pre_conversion_fp32_top1"] = top1(s_logits, data.test.y)
            acc["int8_vs_fp32_agreement"] = agreement(d_logits, s_logits)
        final_name, measured = "final_int8", int8_sparsity(int8, student)
        compact_path = out / COMPACT_FILE
        save_compact(int8, compact_path, meta={
            "model": config.model.name, "width": config.model.width, "num_classes": data.num_classes,
            "image_shape": list(data.image_shape), "quantize_mode": student.form, "dataset": data.name,
            "mean": list(data.mean), "std": list(data.std)})
        verify_compact(compact_path, int8)  # decodes it and compares bit for bit
        compact_sizes = {"compact_int8": file_bytes(compact_path), "compact_file": compact_path.name}
        quantization = {"backend": "x86", "float_modules": float_modules(int8)}
        if quantization["float_modules"]:
            log.warning("quantize: %d operation(s) stay FP32 in the INT8 model (no x86 integer kernel; dequantized around): %s",
                        len(quantization["float_modules"]), ", ".join(f"{f['name']} ({f['type']})" for f in quantization["float_modules"]))
    else:
        deployed_path = out / "model_fp32.safetensors"
        save_checkpoint(deployed_path, student.model.state_dict(), {"form": "fp32"})
        deployed, d_logits, final_name = student.model, s_logits, "final_fp32"
        measured = None
    acc["final_top1"] = top1(d_logits, data.test.y)
    acc["final_vs_teacher_agreement"] = agreement(d_logits, t_logits)

    layers = list(student.masks) or prunable_layers(student.model, config.prune.exclude)
    sparsity = {
        "target": config.prune.sparsity if "prune" in [s.stage for s in config.stages] else 0.0,
        "achieved": global_sparsity(student.model, layers),
        "achieved_int8": measured,
        "prunable_layers": len(layers),
    }
    lat = measure_run_latency(config, data, teacher=teacher, teacher_path=teacher_path, deployed=deployed,
                              deployed_path=deployed_path, final_name=final_name)
    return {
        "schema": METRICS_SCHEMA,
        "model": config.model.name,
        "width": config.model.width,
        "dataset": data.name,
        "num_classes": data.num_classes,
        "stages": config.stage_string(),
        "stage_order": [s.stage for s in config.stages],
        "epochs": {"teacher": 0 if config.teacher.weights else config.teacher.epochs, **{s.stage: s.epochs for s in config.stages}},
        "teacher_source": f"weights:{config.teacher.weights}" if config.teacher.weights else "trained",
        "final_form": "int8" if student.quantized else "fp32",
        "accuracy": acc,
        "sparsity": sparsity,
        "quantization": quantization,
        "size_bytes": {"teacher_fp32": file_bytes(teacher_path), "final": file_bytes(deployed_path), "final_file": deployed_path.name,
                       **compact_sizes},
        "latency": lat,
        "faithfulness": faithfulness(t_logits, d_logits, data.test.y, class_names=data.test.classes),
    }


def int8_sparsity(int8: nn.Module, student: Student) -> float | None:
    """Fraction of exactly-zero int8 values at the masked layers of the converted model."""
    zeros = total = 0
    for path in student.masks:
        mod = int8.get_submodule(path)
        w = mod.weight() if callable(getattr(mod, "weight", None)) else masked_weight(int8, path).detach()  # a layer left FP32
        q = w.int_repr() if w.is_quantized else w
        zeros += int((q == 0).sum())
        total += q.numel()
    return zeros / total if total else None


def _jit_bytes(module: torch.jit.ScriptModule) -> bytes:
    import io

    buf = io.BytesIO()
    torch.jit.save(module, buf)
    return buf.getvalue()
