"""Which linear layers can fp8dq (torchao's per-row fp8 GEMM, ``torch._scaled_mm``) run with few rows, as in
batch-1 decode? One ``nn.Linear`` per shape, quantised by torchao's ``quantize_`` with the suite's fp8dq config
(path ``torchao``: the bias in the GEMM's epilogue) and by the suite's ``fp8dq`` step (path ``suite``: the bias
added after the GEMM), called with ROWS rows, eagerly and compiled with CUDA graphs; prints ``ok`` or the error.

    python benchmarks/gpu/fp8dq_shapes.py                      # opt-125m and opt-6.7b shapes, 1 and 16 rows
    python benchmarks/gpu/fp8dq_shapes.py --rows 1,16,17,32 --modes eager \\
        --shapes 16384x4096,16384x4096+bias,8192x2048+bias,12288x4096+bias

docs/results.md section 5g: on the H200, cuBLASLt finds no algorithm for the GEMM with a bias epilogue when the
input is wide (in features 8192 or more) and the rows few, so opt-6.7b's fc2 (16384 -> 4096, with bias) fails on
the ``torchao`` path; the suite's fp8dq keeps the bias out of the GEMM for that reason.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# in x out, "+bias" when the layer has one: opt-125m's q/k/v fused, fc1, fc2, head; then opt-6.7b's
DEFAULT_SHAPES = ("768x2304+bias,768x3072+bias,3072x768+bias,768x50272,"
                  "4096x12288+bias,4096x4096+bias,4096x16384+bias,16384x4096+bias,4096x50272")


def parse_shape(text: str) -> tuple[int, int, bool]:
    dims, bias = text.removesuffix("+bias"), text.endswith("+bias")
    k, n = (int(x) for x in dims.split("x"))
    return k, n, bias


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated INxOUT[+bias]")
    ap.add_argument("--rows", default="1,16", help="comma-separated row counts (batch-1 decode: 1)")
    ap.add_argument("--modes", default="eager,compiled", help="eager and/or compiled (CUDA graphs)")
    ap.add_argument("--paths", default="torchao,suite",
                    help="torchao (quantize_, bias in the GEMM) and/or suite (the fp8dq step, bias after it)")
    a = ap.parse_args()

    import torch
    from torchao.quantization import quantize_

    from efficiency.techniques.base import Context
    from efficiency.techniques.torchao_quant import TorchaoQuant

    step = TorchaoQuant("fp8dq")

    def quantised(lin: torch.nn.Linear, path: str) -> torch.nn.Module:
        if path == "torchao":
            quantize_(lin, step.config())
            return lin
        ctx = Context(device="cuda", tokenizer=None, model_name="layer", cache_dir=Path("."))
        return step.apply(torch.nn.Sequential(lin), ctx)

    for rows in (int(r) for r in a.rows.split(",")):
        for k, n, bias in (parse_shape(s) for s in a.shapes.split(",")):
            for mode, path in ((m, p) for m in a.modes.split(",") for p in a.paths.split(",")):
                torch._dynamo.reset()
                layer = quantised(torch.nn.Linear(k, n, bias=bias, device="cuda", dtype=torch.bfloat16), path)
                fn = layer if mode == "eager" else torch.compile(layer, mode="reduce-overhead", fullgraph=True)
                x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                try:
                    with torch.inference_mode():
                        for _ in range(3):
                            fn(x)
                    torch.cuda.synchronize()
                    outcome = "ok"
                except Exception as err:  # noqa: BLE001 - the error is the result
                    outcome = f"FAIL {type(err).__name__}: {str(err)[:90]}"
                print(f"rows {rows} {k}x{n} bias={bias} {mode} {path}: {outcome}", flush=True)


if __name__ == "__main__":
    main()
