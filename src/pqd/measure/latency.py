"""Wall-clock CPU latency, measured fairly.

:func:`interleave` times variants that run in this process (:class:`InProcess`, what
:func:`measure_latency` uses) or in worker processes of their own
(:class:`pqd.measure.workers.Worker`, what ``pqd bench`` and a pipeline run use), each with
a fixed thread count. After a warm-up, the timed calls are interleaved in *blocks*: each
round gives every variant one block of consecutive calls (the order rotating every
round), so machine drift hits every variant alike. Each block starts with ``settle_ms``
of calls that are run but not timed.

Why blocks and not one call per variant per round: every runtime keeps its own thread
pool, and an idle pool keeps spinning for a while after its last call (OpenMP in
PyTorch, TBB in OpenVINO, ONNX Runtime's pool unless told not to). With one call per
round each timed call competes with the previous variant's spinning threads and starts on
cold caches. On the demo model at 2 threads that inflated PyTorch INT8 from 0.26 ms
(back to back, as a server loop runs it) to 1.08 ms. Blocks measure the steady state a
deployed model runs in; the settle time absorbs the hand-over between runtimes.

Medians, p90s, means and standard deviations are reported, with ratios against the first
variant (the baseline) measured in the same run.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from pqd.config import MEASURE
from pqd.measure.worker import time_block


@dataclass(frozen=True)
class Blocks:
    """Per round, each variant runs ``settle_ms`` of untimed calls (at least one), then ``timed`` timed calls."""

    timed: int
    settle_ms: float

    def __post_init__(self):
        if self.timed < 1 or not self.settle_ms >= 0:
            raise ValueError(
                f"Blocks(timed={self.timed}, settle_ms={self.settle_ms}): need timed >= 1 and settle_ms >= 0"
            )


#: Batch 1: 25 timed calls per block after 50 ms of settle calls. On the 2-core reference
#: machine a variant reached its back-to-back speed 10-15 ms after another runtime's block,
#: and up to ~45 ms after an ONNX Runtime session with thread spinning on (its default);
#: see docs/BENCHMARKS.md and benchmarks/independent_check.py.
SMALL_BATCH_BLOCKS = Blocks(timed=25, settle_ms=50.0)
#: Larger batches: a call lasts milliseconds, so short blocks keep many rounds (and so the
#: interleaving) within a small number of timed calls.
LARGE_BATCH_BLOCKS = Blocks(timed=3, settle_ms=50.0)


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class BlockTimer(Protocol):
    """Something that runs one variant: in this process (:class:`InProcess`) or in a worker
    process (:class:`pqd.measure.workers.Worker`)."""

    def warmup(self, batch: int, n: int) -> None: ...

    def block(self, batch: int, *, settle_ms: float, timed: int) -> tuple[list[float], int]: ...


class InProcess:
    """A callable timed in this process on fixed inputs (one per batch size)."""

    def __init__(self, fn: Callable, inputs: Mapping[int, object]):
        self.fn, self.inputs = fn, inputs

    def warmup(self, batch: int, n: int) -> None:
        x = self.inputs[batch]
        for _ in range(n):
            self.fn(x)

    def block(self, batch: int, *, settle_ms: float, timed: int) -> tuple[list[float], int]:
        return time_block(self.fn, self.inputs[batch], settle_ms=settle_ms, timed=timed)


def interleave(
    timers: Mapping[str, BlockTimer],
    *,
    batch_sizes: tuple[int, ...] = MEASURE.batch_sizes,
    threads: int,
    warmup: int = MEASURE.warmup,
    runs: int = MEASURE.runs,
    large_batch_runs: int = MEASURE.large_batch_runs,
    blocks: Blocks = SMALL_BATCH_BLOCKS,
    large_batch_blocks: Blocks = LARGE_BATCH_BLOCKS,
) -> list[dict]:
    """Time every timer in rotating rounds of one block each; the first is the baseline.

    Batch 1 gets ``runs`` timed calls per variant in ``blocks``; larger batches get
    ``large_batch_runs`` in ``large_batch_blocks``. ``threads`` is recorded, not set (each
    timer runs with the threads it was built with). Returns one record per (variant,
    batch) with median/p90/mean/std in ms, images/s and ``ratio_to_baseline`` (baseline
    median / this median: >1 means faster).
    """
    names = list(timers)
    if not names:
        raise ValueError("measure_latency needs at least one model")
    if runs < 1 or large_batch_runs < 1 or warmup < 0:
        raise ValueError(
            f"measure_latency: runs ({runs}) and large_batch_runs ({large_batch_runs}) must be >= 1, "
            f"warmup ({warmup}) >= 0"
        )
    records: list[dict] = []
    for bs in batch_sizes:
        n, blk = (runs, blocks) if bs == 1 else (large_batch_runs, large_batch_blocks)
        for k in names:
            timers[k].warmup(bs, warmup if bs == 1 else max(2, warmup // 5))
        times: dict[str, list[float]] = {k: [] for k in names}
        settles: dict[str, list[int]] = {k: [] for k in names}
        for r in range(math.ceil(n / blk.timed)):
            for j in range(len(names)):
                k = names[(r + j) % len(names)]
                ts, settle = timers[k].block(bs, settle_ms=blk.settle_ms, timed=min(blk.timed, n - len(times[k])))
                times[k] += ts
                settles[k].append(settle)
        base = statistics.median(times[names[0]])
        for k in names:
            ts = times[k]
            med = statistics.median(ts)
            records.append(
                {
                    "model": k,
                    "batch": bs,
                    "threads": threads,
                    "runs": len(ts),
                    "median_ms": med * 1e3,
                    "p90_ms": _percentile(ts, 0.9) * 1e3,
                    "mean_ms": statistics.fmean(ts) * 1e3,
                    "std_ms": statistics.pstdev(ts) * 1e3,
                    "images_per_s": bs / med,
                    "ratio_to_baseline": base / med,
                    "blocks": asdict(blk)
                    | {"rounds": len(settles[k]), "settle_calls_median": statistics.median(settles[k])},
                }
            )
    return records


def measure_latency(
    models: Mapping[str, Callable[[torch.Tensor], object]],
    *,
    input_shape: tuple[int, ...],
    batch_sizes: tuple[int, ...] = MEASURE.batch_sizes,
    threads: int = 2,
    warmup: int = MEASURE.warmup,
    runs: int = MEASURE.runs,
    large_batch_runs: int = MEASURE.large_batch_runs,
    blocks: Blocks = SMALL_BATCH_BLOCKS,
    large_batch_blocks: Blocks = LARGE_BATCH_BLOCKS,
    seed: int = 0,
) -> list[dict]:
    """Time callables in this process with ``threads`` torch threads; see :func:`interleave`.

    For models of one runtime (PyTorch, as in a pipeline run). Several runtimes are better
    timed in worker processes of their own (:mod:`pqd.measure.workers`, as ``pqd bench``
    does): in one process they disturb each other.
    """
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(seed)
        inputs = {bs: torch.randn(bs, *input_shape, generator=gen) for bs in batch_sizes}
        with torch.inference_mode():
            return interleave(
                {k: InProcess(f, inputs) for k, f in models.items()},
                batch_sizes=batch_sizes,
                threads=threads,
                warmup=warmup,
                runs=runs,
                large_batch_runs=large_batch_runs,
                blocks=blocks,
                large_batch_blocks=large_batch_blocks,
            )
    finally:
        torch.set_num_threads(old_threads)
