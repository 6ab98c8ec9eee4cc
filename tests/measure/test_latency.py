"""measure_latency: block interleaving, settle calls, exact run counts, ratios."""

import time

import pytest
import torch

from pqd.measure import Blocks, measure_latency


class Recorder:
    """Fake models that log every call as (name, batch size) into one shared list."""

    def __init__(self):
        self.log: list[tuple[str, int]] = []

    def model(self, name: str):
        def f(x):
            self.log.append((name, x.shape[0]))

        return f


def test_blocks_rotate_and_time_exact_run_counts():
    rec = Recorder()
    models = {k: rec.model(k) for k in ("a", "b", "c")}
    out = measure_latency(
        models, input_shape=(3, 4, 4), batch_sizes=(1,), warmup=0, runs=7, blocks=Blocks(timed=3, settle_ms=0)
    )
    assert [r["runs"] for r in out] == [7, 7, 7]
    assert [(r["blocks"]["rounds"], r["blocks"]["settle_calls_median"]) for r in out] == [(3, 1)] * 3
    # 7 timed calls at 3 per block -> 3 rounds, each block led by one settle call (settle_ms=0 still runs one);
    # the last round times only one call per model
    calls = [name for name, _ in rec.log]
    runs = []
    for name in calls:
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    assert [n for n, _ in runs] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # order rotates every round
    assert [c for _, c in runs] == [4, 4, 4, 4, 4, 4, 2, 2, 2]  # settle + timed, last round shorter
    assert len(calls) == 3 * (7 + 3 * 1)


def test_large_batches_use_their_own_blocks_and_run_count():
    rec = Recorder()
    out = measure_latency(
        {"a": rec.model("a"), "b": rec.model("b")},
        input_shape=(1,),
        batch_sizes=(1, 8),
        warmup=0,
        runs=4,
        large_batch_runs=3,
        blocks=Blocks(timed=2, settle_ms=0),
        large_batch_blocks=Blocks(timed=1, settle_ms=0),
    )
    assert [(r["model"], r["batch"], r["runs"], r["blocks"]["timed"], r["blocks"]["rounds"]) for r in out] == [
        ("a", 1, 4, 2, 2),
        ("b", 1, 4, 2, 2),
        ("a", 8, 3, 1, 3),
        ("b", 8, 3, 1, 3),
    ]
    assert sum(1 for _, bs in rec.log if bs == 8) == 2 * (
        2 + 3 * 2
    )  # per model: 2 warm-up calls, 3 blocks of (1 settle + 1 timed)


def test_settle_calls_absorb_the_hand_over_between_runtimes():
    """A model that is slow only on its first call after another model ran (a competing
    thread pool, cold caches): one call per model per round would time only that slow
    path; blocks time the steady state."""
    last = {"name": None}

    def model(name):
        def f(x):
            if last["name"] != name:
                time.sleep(0.004)
            last["name"] = name

        return f

    models = {k: model(k) for k in "abc"}  # three, so a rotated round never starts with the last model
    # settle_ms=0 still runs one untimed call per block, so the hand-over is never timed ...
    settled = measure_latency(
        models, input_shape=(1,), batch_sizes=(1,), warmup=2, runs=10, blocks=Blocks(timed=5, settle_ms=0)
    )
    # ... and settle_ms longer than the slow path runs several
    long = measure_latency(
        models, input_shape=(1,), batch_sizes=(1,), warmup=2, runs=10, blocks=Blocks(timed=5, settle_ms=10)
    )
    for out in (settled, long):
        assert max(r["median_ms"] for r in out) < 1.0
    assert all(r["blocks"]["settle_calls_median"] > 1 for r in long)


def test_ratios_are_against_the_first_model_and_slower_is_below_one():
    models = {"base": lambda x: time.sleep(0.002), "fast": lambda x: None}
    out = {r["model"]: r for r in measure_latency(models, input_shape=(1,), batch_sizes=(1,), warmup=1, runs=9)}
    assert out["base"]["ratio_to_baseline"] == pytest.approx(1.0)
    assert out["base"]["median_ms"] >= 2.0
    assert out["fast"]["ratio_to_baseline"] == pytest.approx(out["base"]["median_ms"] / out["fast"]["median_ms"])
    assert out["fast"]["ratio_to_baseline"] > 1.0
    for r in out.values():
        assert (
            r["p90_ms"] >= r["median_ms"]
            and r["std_ms"] >= 0
            and r["images_per_s"] == pytest.approx(1e3 / r["median_ms"])
        )


def test_thread_count_is_set_during_and_restored_after():
    seen = []
    before = torch.get_num_threads()
    measure_latency(
        {"a": lambda x: seen.append(torch.get_num_threads())},
        input_shape=(1,),
        batch_sizes=(1,),
        threads=1,
        warmup=0,
        runs=2,
        blocks=Blocks(timed=2, settle_ms=0),
    )
    assert set(seen) == {1}
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("timed,settle_ms", [(0, 10), (5, -1), (5, float("nan"))])
def test_bad_blocks_are_rejected_with_the_rule(timed, settle_ms):
    with pytest.raises(ValueError, match="timed >= 1 and settle_ms >= 0"):
        Blocks(timed=timed, settle_ms=settle_ms)


def test_bad_run_counts_name_the_argument():
    with pytest.raises(ValueError, match="runs"):
        measure_latency({"a": lambda x: None}, input_shape=(1,), runs=0)
    with pytest.raises(ValueError, match="at least one model"):
        measure_latency({}, input_shape=(1,))
