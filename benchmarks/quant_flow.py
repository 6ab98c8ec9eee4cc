"""Why pqd converts with the FX graph-mode flow: FX+TorchScript vs torchao PT2E+Inductor.

    pip install -e '.[bench]'
    python benchmarks/quant_flow.py [--width 1.0] [--threads 2] [--out benchmarks/results/quant_flow.json]

Builds CIFAR ResNet-18, quantizes it both ways (same calibration data), and times batch-1
CPU latency of FP32 eager, FX INT8 (TorchScript frozen), and PT2E INT8 compiled with
Inductor (freezing on), interleaved in one process. Also reports preparation and
compilation wall time. Untrained weights: this is about speed, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from pqd.compress.qat import prepare, to_torchscript
from pqd.compress.student import Student, convert_student
from pqd.measure import environment, measure_latency
from pqd.models.registry import create_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/quant_flow.json"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = create_model("resnet18", width=args.width).eval()
    calib = [torch.randn(16, 3, 32, 32) for _ in range(4)]
    x1 = torch.zeros(1, 3, 32, 32)

    t = time.perf_counter()
    fx = prepare(model, x1, mode="ptq")
    with torch.no_grad():
        for c in calib:
            fx(c)
    fx_ts = to_torchscript(convert_student(Student(fx, form="ptq")), x1)
    fx_s = time.perf_counter() - t

    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    t = time.perf_counter()
    batch = torch.export.Dim("batch", max=4096)
    exported = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: batch},)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    pt = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for c in calib:
            pt(c)
    pt = convert_pt2e(pt)
    pt2e_prep_s = time.perf_counter() - t
    inductor_config.freezing = True
    t = time.perf_counter()
    with torch.no_grad():
        compiled = torch.compile(pt)
        compiled(x1)
    compile_s = time.perf_counter() - t

    recs = measure_latency(
        {"fp32_eager": model, "fx_int8_torchscript": fx_ts, "pt2e_int8_inductor": compiled},
        input_shape=(3, 32, 32),
        batch_sizes=(1,),
        threads=args.threads,
        runs=args.runs,
    )
    result = {
        "width": args.width,
        "fx_prepare_convert_s": fx_s,
        "pt2e_prepare_convert_s": pt2e_prep_s,
        "pt2e_compile_s": compile_s,
        "latency": recs,
        "env": environment(args.threads),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for r in recs:
        print(
            f"{r['model']:<22} b=1 median {r['median_ms']:.3f} ms  p90 {r['p90_ms']:.3f} ms  {r['ratio_to_baseline']:.2f}x vs FP32"
        )
    print(
        f"FX prepare+convert {fx_s:.1f} s; PT2E prepare+convert {pt2e_prep_s:.1f} s + Inductor compile {compile_s:.1f} s"
    )


if __name__ == "__main__":
    main()
