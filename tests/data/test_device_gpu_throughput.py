"""tools/gpu/gpu_throughput.py runs end to end in --quick mode on the CPU and writes its record."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).parents[2] / "tools" / "gpu" / "gpu_throughput.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_throughput", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_every_phase(tmp_path):
    bench = _load()
    assert bench.main(["--quick", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu_throughput.json").read_text())
    assert (
        res["schema"] == bench.SCHEMA and res["quick"] is True and res["partial"] is False and res["batch_size"] == 16
    )
    assert set(res["phases"]) == set(bench.PHASES)
    for name in bench.PHASES:
        p = res["phases"][name]
        assert p["loop"]["images_per_s"] > 0 and p["ceiling"]["images_per_s"] > 0, name
        assert p["fraction_of_ceiling"] == round(p["loop"]["images_per_s"] / p["ceiling"]["images_per_s"], 4)
        assert len(p["loop"]["epoch_s"]) == 2  # warm-up epoch + one timed epoch
    pr = res["phases"]["prune"]
    assert len(pr["loop"]["compute_masks_s_per_epoch"]) == 2 and len(pr["breakdown"]) == 3
    assert pr["compute_masks"]["device_masks_equal_fraction"] > 0.99
    qat = res["phases"]["qat"]
    assert "error" in qat["ceiling_bf16_autocast"]  # the fused fake-quant op has no bf16 kernel ...
    assert qat["ceiling_bf16_autocast_fp32_fake_quant"]["images_per_s"] > 0  # ... unless fed FP32
    ag = res["qat_bf16_int8_agreement"]
    assert ag["test_images"] == 32
    assert (
        0 <= ag["int8_agreement_bf16_vs_fp32"] <= 1 and ag["int8_agreement_fp32_vs_fp32_rerun"] == 1.0
    )  # CPU is deterministic
    md = (tmp_path / "gpu_throughput.md").read_text()
    assert "| qat_kd |" in md and "--quick" in md and res["optimisation_ideas"][0][:20] in md
