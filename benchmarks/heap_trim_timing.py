"""Does returning the C allocator's free memory to the OS (glibc ``malloc_trim(0)``) slow the CPU work after it?

Why it matters: the CPU peak-memory tracker can return that memory before a window, so that the window's
allocations raise the resident set size instead of reusing memory freed earlier (efficiency.measure.memory).
If the rounds after a trim run slower, a trim before a timed window would change what it times. This times
SmolLM2-135M's greedy ``generate`` (128-token prompt, 16 new tokens) in blocks of rounds: steady, then right after
a trim, repeated. SmolLM2 is the dequantised Q4_1 GGUF of the Instruct model (the suite's ``smollm2-135m``).

    python benchmarks/heap_trim_timing.py OUT.json [--dtype bfloat16] [--blocks 3] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from efficiency.measure.memory import release_free_heap
from efficiency.settings import default_cache_dir
from efficiency.smollm2 import ensure_dequantised


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("EFFICIENCY_CACHE_DIR") or
                                                                default_cache_dir()))
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(ensure_dequantised(args.cache_dir),
                                                 dtype=getattr(torch, args.dtype)).eval()
    torch.manual_seed(0)
    prompt = torch.randint(0, 1000, (1, 128))

    def block() -> list[float]:
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, min_new_tokens=16,
                               max_new_tokens=16, pad_token_id=0)
            times.append(time.perf_counter() - t0)
        return times

    block()  # warm-up
    blocks = []
    for _ in range(args.blocks):
        steady = block()
        if not release_free_heap():  # the tracker's own trim
            raise SystemExit("no glibc malloc_trim here: nothing to measure")
        blocks.append({"steady_s": steady, "after_trim_s": block()})
    steady_all = [t for b in blocks for t in b["steady_s"]]
    after_all = [t for b in blocks for t in b["after_trim_s"]]
    report = {
        "what": "SmolLM2-135M (dequantised Q4_1 GGUF) greedy generate, 128-token prompt, 16 new tokens, s per round",
        "dtype": args.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "blocks": blocks,
        "steady_median_s": statistics.median(steady_all), "after_trim_median_s": statistics.median(after_all),
        "steady_range_s": [min(steady_all), max(steady_all)], "after_trim_range_s": [min(after_all), max(after_all)],
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "blocks"}, indent=1))


if __name__ == "__main__":
    main()
