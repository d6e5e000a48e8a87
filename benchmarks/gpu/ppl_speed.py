"""Perplexity-pass speed against Hugging Face's one-window recipe, at the same perplexity.

`python benchmarks/gpu/ppl_speed.py OUT.json [--model opt-125m] [--tokens 65536]` on a GPU, random weights from
$EFFICIENCY_DATA_DIR/architectures/<model> (the perplexity of random weights is meaningless, but both loops compute
the same function of them, so their agreement is a real check). Variants: the HF recipe (one window per forward,
the model's own loss, labels -100 outside the target), the suite's evaluator with batch 4, with the automatic
batch, and with the automatic batch on the compiled model (regional compile). fp32 for the equality check (TF32
off: same arithmetic), bf16 for speed. Median of 3 timed passes after a warm-up pass.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def timed(fn: Any, rounds: int = 3) -> tuple[float, Any]:
    fn()  # warm-up (and compilation)
    torch.cuda.synchronize()
    times, out = [], None
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from efficiency.measure.perplexity import PerplexityEvaluator, auto_batch_size, hf_recipe_perplexity
    from efficiency.techniques.base import Context, parse

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--model", default="opt-125m")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    folder = Path(os.environ["EFFICIENCY_DATA_DIR"]) / "architectures" / a.model
    config = AutoConfig.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (a.tokens,), generator=g).cuda()
    rows: list[dict[str, Any]] = []
    model: Any = None
    cmodel: Any = None
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        t_hf, ppl_hf = timed(lambda m=model: hf_recipe_perplexity(m, ids, a.context, a.stride)[0])
        rows.append({"dtype": str(dtype), "variant": "hf-recipe (1 window)", "s": t_hf, "ppl": ppl_hf})
        n_windows = len(PerplexityEvaluator(ids, a.context, a.stride, 1).plan)
        auto = auto_batch_size(model, a.context, a.stride, "cuda", n_windows)
        sizes = ((4, 16, 32) if dtype == torch.bfloat16 else (4,))
        for label, batch in ([(f"suite batch {b}", b) for b in sizes] + [(f"suite auto batch ({auto})", None)]):
            ev = PerplexityEvaluator(ids, a.context, a.stride, batch)
            t, res = timed(lambda e=ev, m=model: e.run(m, "cuda"))
            rows.append({"dtype": str(dtype), "variant": label, "s": t, "ppl": res.perplexity,
                         "batch": res.batch_size})
        if dtype == torch.bfloat16:
            ctx = Context(device="cuda", tokenizer=None, model_name=a.model, cache_dir=Path("."))
            pipe = parse("compile")
            ctx.info["order"] = ["compile"]
            cmodel = pipe.apply(model, ctx)
            ev = PerplexityEvaluator(ids, a.context, a.stride, None)
            t, res = timed(lambda e=ev, m=cmodel: e.run(m, "cuda"))
            rows.append({"dtype": str(dtype), "variant": f"suite auto batch ({res.batch_size}) + compile", "s": t,
                         "ppl": res.perplexity, "batch": res.batch_size})
        model = cmodel = None
        torch.cuda.empty_cache()
    for r in rows:
        base = next(x for x in rows if x["dtype"] == r["dtype"] and x["variant"].startswith("hf-recipe"))
        r["speedup_vs_hf"] = base["s"] / r["s"]
        r["ppl_rel_diff_vs_hf"] = abs(r["ppl"] - base["ppl"]) / base["ppl"]
        print(f"{r['dtype']:15s} {r['variant']:38s} {r['s']:8.4f} s  x{r['speedup_vs_hf']:6.2f}  ppl {r['ppl']:.6f} "
              f"rel {r['ppl_rel_diff_vs_hf']:.1e}")
    Path(a.out).write_text(json.dumps({"model": a.model, "tokens": a.tokens, "context": a.context,
                                       "stride": a.stride, "device": torch.cuda.get_device_name(),
                                       "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
