"""How long NNCF PTQ of a teacher takes, and its latency beside the FP32 teacher in OpenVINO.

    python benchmarks/peer_nncf_timing.py [--width 0.25] [--calibration 300] [--out /tmp/nncf_peer]

Untrained weights on the digits data (3x32x32 like CIFAR): the time to quantize depends on
the graph and the number of calibration images, not on what the weights learned; accuracy
figures from this script mean nothing. Prints one JSON record.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import pqd
from pqd.commands.peers import NncfPtqConfig, nncf_ptq, time_peer
from pqd.data import load_data
from pqd.models.registry import create_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--calibration", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="openvino")
    p.add_argument("--out", default="/tmp/nncf_peer")
    p.add_argument("--no-latency", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    data = load_data(pqd.DataConfig(dataset="digits", train_subset=max(300, a.calibration), test_subset=300))
    model = create_model("resnet18", num_classes=10, width=a.width).eval()
    t = time.perf_counter()
    rec = nncf_ptq(
        model, data, a.out, config=NncfPtqConfig(calibration_size=a.calibration, threads=a.threads, backend=a.backend)
    )
    rec["timings_s"]["total_s"] = round(time.perf_counter() - t, 3)
    out = {
        "width": a.width,
        "backend": a.backend,
        "calibration": a.calibration,
        "threads": a.threads,
        "timings_s": rec["timings_s"],
        "bytes": rec["artefact"]["bytes"],
        "agreement_with_teacher": rec["evaluation"]["agreement_with_teacher"],
    }
    if not a.no_latency:
        lat = time_peer(rec, input_shape=data.image_shape, threads=(a.threads,), batch_sizes=(1, 64))
        out["latency"] = [
            {k: r[k] for k in ("model", "runtime", "precision", "batch", "threads", "median_ms", "p90_ms")} for r in lat
        ]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
