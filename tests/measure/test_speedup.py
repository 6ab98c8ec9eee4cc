import pytest

from pqd.measure.speedup import (
    THREAD_SLOWDOWN_MARGIN,
    best_deployment_ratios,
    deployments,
    fastest_deployments,
    format_ratio,
    format_summary,
    format_thread_flag,
    same_runtime_ratios,
    slower_with_more_threads,
    speedup_summary,
)


def _rec(model, runtime, precision, proxy, median, *, batch=1, threads=2, p90=None):
    return {
        "model": model,
        "runtime": runtime,
        "precision": precision,
        "proxy_model": proxy,
        "batch": batch,
        "threads": threads,
        "median_ms": median,
        "p90_ms": p90 if p90 is not None else median * 1.1,
        "mean_ms": median,
    }


def bench_records():
    """The shape of ``pqd bench``'s ``latency`` list (one thread count, batches 1 and 64)."""
    out = []
    for bs, k in ((1, 1.0), (64, 40.0)):
        out += [
            _rec("pytorch_fp32_eager", "pytorch", "fp32", "teacher", 3.0 * k, batch=bs),
            _rec("pytorch_int8", "pytorch", "int8", "final", 1.0 * k, batch=bs),
            _rec("onnxruntime_fp32", "onnxruntime", "fp32", "teacher", 1.2 * k, batch=bs),
            _rec(
                "onnxruntime_int8", "onnxruntime", "int8", "final", 1.5 * k, batch=bs
            ),  # ORT INT8 slower than its FP32
            _rec("openvino_fp32", "openvino", "fp32", "teacher", 1.6 * k, batch=bs),
            _rec("openvino_int8", "openvino", "int8", "final", 0.8 * k, batch=bs),
        ]
    return out


def test_labels_and_inference_for_pipeline_records():
    deps = deployments(
        [
            {"model": "teacher_fp32", "batch": 1, "threads": 2, "median_ms": 2.0},
            {"model": "final_int8", "batch": 1, "threads": 2, "median_ms": 1.0},
        ]
    )
    assert [d.label for d in deps] == ["teacher FP32 @ PyTorch eager", "pqd INT8 @ PyTorch TorchScript"]
    r = same_runtime_ratios(
        [
            {"model": "teacher_fp32", "batch": 1, "threads": 2, "median_ms": 2.0},
            {"model": "final_int8", "batch": 1, "threads": 2, "median_ms": 1.0},
        ]
    )
    assert len(r) == 1 and r[0]["kind"] == "pytorch_eager_vs_compiled" and r[0]["ratio"] == 2.0


def test_same_runtime_ratios_name_both_sides():
    r = {(x["denominator"], x["batch"]): x for x in same_runtime_ratios(bench_records())}
    ov = r[("pqd INT8 @ OpenVINO", 1)]
    assert ov["numerator"] == "teacher FP32 @ OpenVINO" and ov["kind"] == "same_runtime"
    assert ov["ratio"] == pytest.approx(2.0) and ov["batch"] == 1 and ov["threads"] == 2
    ort = r[("pqd INT8 @ ONNX Runtime", 1)]
    assert ort["numerator"] == "teacher FP32 @ ONNX Runtime" and ort["ratio"] == pytest.approx(0.8)
    pt = r[("pqd INT8 @ PyTorch TorchScript", 1)]
    assert (
        pt["numerator"] == "teacher FP32 @ PyTorch eager"
        and pt["kind"] == "pytorch_eager_vs_compiled"
        and pt["ratio"] == 3.0
    )
    assert len(r) == 6  # 3 runtimes x 2 batches; never across batches


def test_best_deployment_and_fastest():
    best = {x["batch"]: x for x in best_deployment_ratios(bench_records())}
    # fastest INT8 is OpenVINO (0.8), fastest FP32 is ONNX Runtime (1.2): 1.5x, not 3.0x (vs eager)
    assert best[1]["numerator"] == "teacher FP32 @ ONNX Runtime" and best[1]["denominator"] == "pqd INT8 @ OpenVINO"
    assert best[1]["ratio"] == pytest.approx(1.5) and best[1]["kind"] == "best_deployment"
    fast = {x["batch"]: x for x in fastest_deployments(bench_records())}
    assert fast[1]["fastest"] == "pqd INT8 @ OpenVINO" and fast[1]["int8_is_fastest"]
    assert fast[1]["vs_runner_up"]["numerator"] == "pqd INT8 @ PyTorch TorchScript"
    assert fast[1]["vs_runner_up"]["ratio"] == pytest.approx(1.25)
    assert fast[1]["fastest_fp32"] == "teacher FP32 @ ONNX Runtime"


def test_fp32_can_be_the_fastest_deployment():
    recs = [
        _rec("pytorch_fp32_eager", "pytorch", "fp32", "teacher", 3.0),
        _rec("pytorch_int8", "pytorch", "int8", "final", 1.4),
        _rec("onnxruntime_fp32", "onnxruntime", "fp32", "teacher", 1.0),
        _rec("onnxruntime_int8", "onnxruntime", "int8", "final", 1.3),
    ]
    f = fastest_deployments(recs)[0]
    assert f["fastest"] == "teacher FP32 @ ONNX Runtime" and not f["int8_is_fastest"]
    lines = format_summary(speedup_summary(recs))
    assert any(
        "Fastest measured deployment (batch 1, 2 threads): teacher FP32 @ ONNX Runtime" in ln and "FP32, not INT8" in ln
        for ln in lines
    )
    b = best_deployment_ratios(recs)[0]
    assert b["ratio"] == pytest.approx(1.0 / 1.3)
    assert format_ratio(b).startswith("1.30x slower: pqd INT8 @ ONNX Runtime vs teacher FP32 @ ONNX Runtime")


def test_peer_records_and_stats():
    recs = [
        _rec("openvino_fp32", "openvino", "fp32", "teacher", 2.0, p90=3.0),
        {**_rec("nncf_ptq_int8", "openvino", "int8", None, 1.0, p90=1.0), "source_model": "nncf_ptq"},
    ]
    recs[1].pop("proxy_model")
    r = same_runtime_ratios(recs, stat="p90")
    assert r[0]["denominator"] == "NNCF PTQ INT8 @ OpenVINO" and r[0]["ratio"] == 3.0 and r[0]["stat"] == "p90"
    assert best_deployment_ratios(recs)[0]["denominator"] == "NNCF PTQ INT8 @ OpenVINO"
    with pytest.raises(ValueError):
        same_runtime_ratios(recs, stat="max")


def test_summary_and_format():
    s = speedup_summary(bench_records())
    assert {x["kind"] for x in s["same_runtime"]} == {"same_runtime"}
    assert all(x["kind"] == "pytorch_eager_vs_compiled" for x in s["pytorch_eager_extra"])
    line = format_ratio(
        next(x for x in s["same_runtime"] if x["denominator"] == "pqd INT8 @ OpenVINO" and x["batch"] == 1)
    )
    assert (
        line
        == "2.00x faster: pqd INT8 @ OpenVINO vs teacher FP32 @ OpenVINO (batch 1, 2 threads, median 0.800 vs 1.600 ms)"
    )
    lines = format_summary(s)
    assert lines[0].startswith("Same runtime") and any(ln.startswith("Extra") for ln in lines)


def test_a_peer_variant_in_bench_is_named_by_its_variant():
    # bench's proxy_model for a peer file would be "teacher" (its proxies): the name decides
    recs = [
        _rec("openvino_fp32", "openvino", "fp32", "teacher", 2.0),
        _rec("nncf_ptq_int8", "openvino", "int8", "teacher", 1.0),
    ]
    assert [d.label for d in deployments(recs)] == ["teacher FP32 @ OpenVINO", "NNCF PTQ INT8 @ OpenVINO"]


def two_thread_counts(fp32_eager_2t: float = 4.4):
    """bench records at 1 and 2 threads; PyTorch FP32 eager is slower with 2 threads than with 1."""
    one = [
        _rec("pytorch_fp32_eager", "pytorch", "fp32", "teacher", 2.15, threads=1),
        _rec("pytorch_int8", "pytorch", "int8", "final", 0.60, threads=1),
        _rec("onnxruntime_int8", "onnxruntime", "int8", "final", 0.50, threads=1),
    ]
    two = [
        _rec("pytorch_fp32_eager", "pytorch", "fp32", "teacher", fp32_eager_2t, threads=2),
        _rec("pytorch_int8", "pytorch", "int8", "final", 0.45, threads=2),
        _rec("onnxruntime_int8", "onnxruntime", "int8", "final", 0.52, threads=2),
    ]  # within the margin: not flagged
    return one + two


def test_a_thread_count_slower_than_a_smaller_one_is_flagged():
    (f,) = slower_with_more_threads(two_thread_counts())
    assert (f["variant"], f["deployment"], f["threads"], f["fewer_threads"], f["batch"]) == (
        "pytorch_fp32_eager",
        "teacher FP32 @ PyTorch eager",
        2,
        1,
        1,
    )
    assert f["ratio"] == pytest.approx(4.4 / 2.15) and (f["ms"], f["fewer_threads_ms"]) == (4.4, 2.15)
    assert format_thread_flag(f) == (
        "teacher FP32 @ PyTorch eager is 2.05x slower with 2 threads than with 1 thread "
        "(batch 1, median 4.400 vs 2.150 ms)"
    )
    assert slower_with_more_threads(two_thread_counts(2.15 * THREAD_SLOWDOWN_MARGIN * 0.99)) == []
    assert slower_with_more_threads(bench_records()) == [], "one thread count: nothing to compare"


def test_the_fastest_deployment_verdict_names_the_faster_thread_count():
    recs = two_thread_counts() + [
        _rec("pytorch_int8", "pytorch", "int8", "final", 0.30, threads=1, batch=4),
        _rec("pytorch_int8", "pytorch", "int8", "final", 0.40, threads=2, batch=4),
    ]
    s = speedup_summary(recs)
    over = {f["batch"]: f for f in s["fastest_over_threads"]}
    assert (over[1]["fastest"], over[1]["threads"], over[1]["threads_timed"]) == (
        "pqd INT8 @ PyTorch TorchScript",
        2,
        [1, 2],
    )
    assert (over[4]["threads"], over[4]["fastest_ms"]) == (1, 0.30)
    per = {(f["batch"], f["threads"]): f for f in s["fastest"]}
    assert per[(4, 2)]["faster_with_fewer_threads"] == {"threads": 1, "ms": 0.30}
    assert per[(1, 2)]["faster_with_fewer_threads"] is None
    lines = format_summary(s)
    assert (
        "Fastest measured deployment at batch 4 over 1, 2 threads: pqd INT8 @ PyTorch TorchScript with 1 thread "
        "(0.300 ms median)" in lines
    )
    assert any(
        ln.startswith("Fastest measured deployment (batch 4, 2 threads)")
        and ln.endswith("faster with 1 thread (0.300 ms)")
        for ln in lines
    )
    assert speedup_summary(bench_records())["fastest_over_threads"] == []
