import json

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from pqd.cli import main  # noqa: E402
from pqd.commands.bench import BASELINE, bench_run  # noqa: E402
from pqd.deploy.runtimes import available  # noqa: E402


@pytest.mark.slow
def test_bench_schema_runs_every_installed_runtime(int8_run):
    r = bench_run(int8_run, threads=(1,), batch_sizes=(1, 4), warmup=1, runs=3, large_batch_runs=2)
    want = {BASELINE, "pytorch_int8", "onnxruntime_fp32", "onnxruntime_int8"}
    if available("openvino"):
        want |= {"openvino_fp32", "openvino_int8"}
    else:
        assert "openvino" in r["skipped"]
    assert set(r["variants"]) == want
    assert list(r)[:2] == ["schema", "speedup_summary"]
    sp = r["speedup_summary"]
    same = {(x["numerator"], x["denominator"]) for x in sp["same_runtime"]}
    assert ("teacher FP32 @ ONNX Runtime", "pqd INT8 @ ONNX Runtime") in same
    assert all(x["kind"] == "same_runtime" for x in sp["same_runtime"])
    assert {x["kind"] for x in sp["pytorch_eager_extra"]} == {"pytorch_eager_vs_compiled"}
    assert sp["best_deployment"] and {f["batch"] for f in sp["fastest"]} == {1, 4}
    lat = {(x["model"], x["batch"], x["threads"]): x for x in r["latency"]}
    assert set(lat) == {(v, b, 1) for v in want for b in (1, 4)}
    for (v, b, _), x in lat.items():
        assert x["runs"] == (3 if b == 1 else 2)
        assert 0 < x["median_ms"] <= x["p90_ms"] and x["std_ms"] >= 0
        assert set(x["x_vs_fp32_eager"]) == {"median", "p90", "mean"}
        assert x["proxy_model"] == ("teacher" if x["precision"] == "fp32" else "final")
        if v == BASELINE:
            assert x["x_vs_fp32_eager"]["median"] == 1.0
    # proxies: the pruned final model touches fewer non-zero weights than the dense teacher
    p = r["proxies"]
    assert p["teacher"]["macs"] == p["final"]["macs"] and p["final"]["nonzero_macs"] < p["teacher"]["nonzero_macs"]
    assert p["final"]["nonzero_params"] < p["final"]["params"] == p["teacher"]["params"]
    # peak memory, one fresh process per variant; ONNX Runtime's never imports torch
    rss = r["peak_rss_mb"]
    assert set(rss) == want
    for v, m in rss.items():
        assert "error" not in m, (v, m)
        assert m["peak_rss_mb"] >= m["after_load_mb"] >= m["after_import_mb"] > 0
    assert rss["onnxruntime_int8"]["peak_rss_mb"] < rss["pytorch_int8"]["peak_rss_mb"]
    assert r["env"]["cpu_flags"] is not None and "onnxruntime" in r["env"]["runtimes"]
    if available("openvino"):
        ov = r["variants"]["openvino_int8"]["by_threads"]["1"]
        assert ov["inference_precision_hint"] == "f32"
    ort = r["variants"]["onnxruntime_int8"]["by_threads"]["1"]
    assert ort["intra_op_num_threads"] == 1 and ort["allow_spinning"] is True  # ORT's default, as deployed
    # written out, and merged into metrics.json
    assert json.loads((int8_run / "bench.json").read_text()) == json.loads(json.dumps(r))
    md = (int8_run / "bench.md").read_text()
    assert all(v in md for v in want) and "MACs on non-zero" in md
    metrics = json.loads((int8_run / "metrics.json").read_text())
    assert metrics["bench"]["latency"] == json.loads(json.dumps(r["latency"]))
    assert "accuracy" in metrics, "merging keeps the run's own metrics"


@pytest.mark.slow
def test_pipeline_metrics_carry_faithfulness(int8_run):
    f = json.loads((int8_run / "metrics.json").read_text())["faithfulness"]
    assert f["n"] == 360 and f["k"] == 5
    assert set(f["final"]["per_class"]) == {str(i) for i in range(10)}
    c = f["contingency"]
    assert sum(c.values()) == 360
    assert f["mcnemar"]["b"] == c["teacher_only"] and f["mcnemar"]["c"] == c["final_only"]
    assert 0.0 <= f["mcnemar"]["p_value"] <= 1.0


@pytest.mark.slow
def test_cli_bench(int8_run, capsys, tmp_path):
    args = [
        "bench",
        str(int8_run),
        "--threads",
        "1",
        "--batch-sizes",
        "1",
        "--runs",
        "2",
        "--warmup",
        "0",
        "--no-rss",
        "--runtimes",
        "pytorch,onnxruntime",
        "--quiet",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "onnxruntime_int8" in out and "pytorch_fp32_eager" in out and "openvino_int8" not in out
    # output leads with the labelled speed-ups: same runtime first, the PyTorch eager ratio only as an extra
    body = out[out.index("## Speed-ups") : out.index("## Timings")]
    assert body.index("Same runtime, INT8 vs FP32 teacher:") < body.index("Extra (PyTorch eager FP32 vs compiled INT8")
    assert "pqd INT8 @ ONNX Runtime vs teacher FP32 @ ONNX Runtime" in body and "Fastest measured deployment" in body
    assert "x PyTorch FP32 eager (extra" in out
    assert main(["bench", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "pqd: error:" in err and "not a pqd run directory" in err and "Traceback" not in err
    assert main(["bench", str(int8_run), "--runtimes", "tensorrt", "--quiet"]) == 2
    assert "unknown runtime" in capsys.readouterr().err


def test_cli_bench_times_pytorch_when_the_onnx_export_fails_and_exits_2(int8_run, capsys, monkeypatch):
    import json

    import torch

    report = (
        "Failed to export the model with torch.export. This is step 1/3 of exporting the model to ONNX.\n"
        "## Exception summary\n\n\x1b[31m<class 'torch._dynamo.exc.Unsupported'>: data-dependent branch in Gate.forward\x1b[0m\n"
        + "".join(f"  dump line {i}\n" for i in range(150))
    )

    def failing_export(*a, **k):
        raise RuntimeError(report)

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    args = [
        "bench",
        str(int8_run),
        "--threads",
        "1",
        "--batch-sizes",
        "1",
        "--runs",
        "2",
        "--warmup",
        "0",
        "--no-rss",
        "--runtimes",
        "pytorch,onnxruntime",
        "--force-export",
        "--quiet",
    ]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "pytorch_int8" in captured.out and "pytorch_fp32_eager" in captured.out
    failed = [ln for ln in captured.err.splitlines() if ln.startswith("FAILED onnxruntime")]
    assert (
        len(failed) == 1
        and "<class 'torch._dynamo.exc.Unsupported'>: data-dependent branch in Gate.forward" in failed[0]
    )
    assert "\x1b" not in captured.err and "dump line" not in captured.err
    result = json.loads((int8_run / "bench.json").read_text())
    assert {r["model"] for r in result["latency"]} == {"pytorch_fp32_eager", "pytorch_int8"}
    assert "dump line 149" in result["failed_detail"]["onnx_export"]


def test_cli_export_writes_its_files_and_exits_2_when_one_runtime_check_crashes(int8_run, capsys, monkeypatch):
    """The same exit rule as bench: results written and printed, FAILED on stderr, exit 2."""
    import pqd.safety.isolate
    from pqd.errors import RuntimeCrash

    real = pqd.safety.isolate.run_isolated

    def ov_crashes(target, args=None, **kw):
        if kw.get("runtime") == "openvino":
            raise RuntimeCrash(
                "runtime openvino / model 'resnet18' crashed with SIGSEGV (exit status -11): a native crash"
            )
        return real(target, args, **kw)

    monkeypatch.setattr(pqd.safety.isolate, "run_isolated", ov_crashes)
    assert main(["export", str(int8_run), "--force", "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "onnxruntime_int8:" in captured.out and "agreement" in captured.out
    assert "FAILED openvino_int8: runtime openvino" in captured.err and "SIGSEGV" in captured.err
    assert (int8_run / "model_int8.onnx").is_file() and (int8_run / "teacher_fp32.onnx").is_file()


@pytest.mark.slow
def test_bench_records_the_worker_environment_and_flags_a_slower_thread_count(int8_run, monkeypatch, caplog, capsys):
    """A deterministic stand-in for the timed calls: FP32 eager 'takes' longer with 2 threads than with 1."""
    from pqd.measure.workers import Worker

    ms = {
        ("pytorch_fp32_eager", 1): 2.0,
        ("pytorch_fp32_eager", 2): 4.0,
        ("pytorch_int8", 1): 0.6,
        ("pytorch_int8", 2): 0.5,
    }
    monkeypatch.setattr(Worker, "warmup", lambda self, batch, n: None)
    monkeypatch.setattr(
        Worker,
        "block",
        lambda self, batch, *, settle_ms, timed: ([ms[(self.name, self.spec["threads"])] / 1e3] * timed, 1),
    )
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    r = bench_run(int8_run, threads=(1, 2), batch_sizes=(1,), warmup=0, runs=3, runtimes=("pytorch",), rss=False)
    (flag,) = r["slower_with_more_threads"]
    assert (flag["variant"], flag["threads"], flag["fewer_threads"], flag["ratio"]) == ("pytorch_fp32_eager", 2, 1, 2.0)
    assert any(
        rec.levelname == "WARNING"
        and "teacher FP32 @ PyTorch eager is 2.00x slower with 2 threads than with 1 thread" in rec.getMessage()
        for rec in caplog.records
    )
    (over,) = r["speedup_summary"]["fastest_over_threads"]
    assert (over["fastest_variant"], over["threads"]) == ("pytorch_int8", 2)
    assert set(r["latency_env"]) == {"1", "2"}
    for t, env in r["latency_env"].items():
        assert env["inherited"] is False and env["variables"]["OMP_NUM_THREADS"] == t
        assert (
            env["variables"]["OMP_WAIT_POLICY"] is None and env["ignored_from_caller"]["OMP_WAIT_POLICY"] == "PASSIVE"
        )
    on_disk = json.loads((int8_run / "bench.json").read_text())
    assert on_disk["latency_env"] == r["latency_env"] and on_disk["slower_with_more_threads"] == [flag]
    md = (int8_run / "bench.md").read_text()
    assert "Worker threading environment: controlled" in md and "Ignored from the caller: " in md
    assert "WARNING: teacher FP32 @ PyTorch eager is 2.00x slower with 2 threads" in md
    # --inherit-env: the caller's environment, recorded as such
    assert (
        main(
            [
                "bench",
                str(int8_run),
                "--threads",
                "1",
                "--batch-sizes",
                "1",
                "--runs",
                "2",
                "--warmup",
                "0",
                "--no-rss",
                "--runtimes",
                "pytorch",
                "--inherit-env",
                "--quiet",
            ]
        )
        == 0
    )
    assert "inherited from the caller's environment (--inherit-env)" in capsys.readouterr().out
    env = json.loads((int8_run / "bench.json").read_text())["latency_env"]["1"]
    assert (
        env["inherited"] is True
        and env["variables"]["OMP_WAIT_POLICY"] == "PASSIVE"
        and env["variables"]["OMP_NUM_THREADS"] == "7"
    )


@pytest.mark.slow
def test_run_metrics_and_env_record_the_latency_environment(int8_run):
    m = json.loads((int8_run / "metrics.json").read_text())
    env = json.loads((int8_run / "env.json").read_text())
    lat = m["latency_env"]
    assert lat["harness"] == "worker processes" and lat["inherited"] is False
    assert lat["variables"]["OMP_NUM_THREADS"] == "1" and "OMP_WAIT_POLICY" in lat["variables"]  # measure.threads: 1
    assert env["latency_env"] == lat and isinstance(env["thread_env"], dict)
