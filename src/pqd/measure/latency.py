"""Wall-clock CPU latency, measured fairly.

All variants are timed in one process with a fixed thread count; after a warm-up, the
timed calls are interleaved round-robin (the order rotating every round) so machine
drift hits every variant alike; medians and p90s are reported with ratios against the
first variant (the baseline) measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import torch


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def measure_latency(
    models: Mapping[str, Callable[[torch.Tensor], object]],
    *,
    input_shape: tuple[int, ...],
    batch_sizes: tuple[int, ...] = (1, 64),
    threads: int = 2,
    warmup: int = 20,
    runs: int = 200,
    large_batch_runs: int = 20,
    seed: int = 0,
) -> list[dict]:
    """Time every model on random inputs; the first entry of ``models`` is the baseline.

    Batch 1 gets ``runs`` timed calls per model; larger batches get ``large_batch_runs``.
    Returns one record per (model, batch) with median/p90/mean/std in ms, images/s and
    ``ratio_to_baseline`` (baseline median / this median: >1 means faster).
    """
    names = list(models)
    if not names:
        raise ValueError("measure_latency needs at least one model")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    records: list[dict] = []
    try:
        gen = torch.Generator().manual_seed(seed)
        for bs in batch_sizes:
            x = torch.randn(bs, *input_shape, generator=gen)
            n = runs if bs == 1 else large_batch_runs
            times: dict[str, list[float]] = {k: [] for k in names}
            with torch.inference_mode():
                for k in names:
                    for _ in range(warmup if bs == 1 else max(2, warmup // 5)):
                        models[k](x)
                for r in range(n):
                    for j in range(len(names)):
                        k = names[(r + j) % len(names)]
                        t0 = time.perf_counter()
                        models[k](x)
                        times[k].append(time.perf_counter() - t0)
            base = statistics.median(times[names[0]])
            for k in names:
                ts = times[k]
                med = statistics.median(ts)
                records.append({
                    "model": k, "batch": bs, "threads": threads, "runs": len(ts),
                    "median_ms": med * 1e3, "p90_ms": _percentile(ts, 0.9) * 1e3,
                    "mean_ms": statistics.fmean(ts) * 1e3, "std_ms": statistics.pstdev(ts) * 1e3,
                    "images_per_s": bs / med, "ratio_to_baseline": base / med,
                })
    finally:
        torch.set_num_threads(old_threads)
    return records
