"""A peer baseline as one run of a study: the sweep's teacher in, a metrics dict out.

:func:`peer_run` is what a sweep variant ``{peer: nncf_ptq}`` executes: it loads the dense
teacher of the variant's teacher identity (``config.teacher.weights``, which the sweep
points at the teacher run's file), quantizes it with NNCF (:func:`pqd.commands.peers.nncf_ptq`),
evaluates it on the run's test split, times it against the same teacher in the same
runtime with pqd's worker harness (the run's ``measure`` settings), and writes
``metrics.json`` (plus ``nncf_ptq.json``) into ``out_dir``. Latency records carry
``runtime`` and ``precision``; ``speedup`` holds :func:`pqd.measure.speedup.speedup_summary`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pqd.commands.peers.nncf_ptq import PEER_NAME, NncfPtqConfig, nncf_ptq, time_peer
from pqd.errors import CheckpointError, ConfigError

PEERS = (PEER_NAME,)
PEER_METRICS_SCHEMA = 1


def peer_run(
    config,
    out_dir: str | Path,
    *,
    peer: str = PEER_NAME,
    teacher_weights: str | Path | None = None,
    nncf: NncfPtqConfig | None = None,
    write: bool = True,
) -> dict:
    """Run peer baseline ``peer`` on ``config``'s teacher into ``out_dir``; return the metrics dict.

    ``config``: the variant's :class:`pqd.run.config.RunConfig` (model, data, seed, measure are
    used; stages are ignored). ``teacher_weights``: the teacher's safetensors file (default
    ``config.teacher.weights``). ``nncf``: NNCF settings (default: 300 calibration images
    chosen with the run's seed, OpenVINO, the run's training threads).
    """
    import torch

    from pqd.data import load_data
    from pqd.measure.speedup import speedup_summary
    from pqd.models.registry import create_model
    from pqd.train.checkpoint import atomic_write_bytes, load_checkpoint

    if peer not in PEERS:
        raise ConfigError(f"peer {peer!r} is not known; choose from {', '.join(PEERS)}")
    weights = Path(teacher_weights or config.teacher.weights or "")
    if not weights.is_file():
        raise CheckpointError(
            f"peer run: teacher weights {str(weights)!r} not found; the peer baseline quantizes a trained "
            "teacher (run the variant's teacher run first, or set teacher.weights)"
        )
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(config.data, seed=config.seed)
    kwargs = {}
    if config.model.width != 1.0:
        kwargs["width"] = config.model.width
    if config.model.dropout:
        kwargs["dropout"] = config.model.dropout
    teacher = create_model(config.model.name, num_classes=data.num_classes, **kwargs)
    teacher.load_state_dict(load_checkpoint(weights)[0])
    teacher.eval()
    cfg = nncf or NncfPtqConfig(seed=config.seed, threads=config.train.threads or None)
    torch.manual_seed(config.seed)
    rec = nncf_ptq(teacher, data, out, config=cfg, write=write)
    m = config.measure
    lat = time_peer(
        rec,
        input_shape=data.image_shape,
        threads=(m.threads,),
        batch_sizes=tuple(m.batch_sizes),
        warmup=m.warmup,
        runs=m.runs,
        large_batch_runs=m.large_batch_runs,
        seed=config.seed,
        inherit_env=m.inherit_env,
    )
    ev = rec["evaluation"]
    metrics = {
        "schema": PEER_METRICS_SCHEMA,
        "kind": "peer",
        "peer": peer,
        "model": config.model.name,
        "width": config.model.width,
        "dataset": data.name,
        "num_classes": data.num_classes,
        "stages": "",
        "final_form": "int8",
        "epochs": {"teacher": config.teacher.epochs},
        "accuracy": {
            "teacher_top1": ev["teacher_top1"]["top1"],
            "final_top1": ev["top1"]["top1"],
            "teacher_top1_ci": ev["teacher_top1"],
            "final_top1_ci": ev["top1"],
            "final_vs_teacher_agreement": ev["agreement_with_teacher"],
            "mcnemar_vs_teacher": ev["mcnemar_vs_teacher"],
            "test_n": ev["n"],
            "test_full_split": config.data.test_subset is None,
            "predictions_file": ev["predictions_file"],
        },
        "size_bytes": {"final": rec["artefact"]["bytes"], "final_file": rec["artefact"]["file"]},
        "latency": lat,
        "speedup": speedup_summary(lat),
        "latency_env": lat[0]["latency_env"] if lat else None,  # one thread count: the same for every record
        "peer_record": rec,
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }
    if write:
        atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    return metrics
