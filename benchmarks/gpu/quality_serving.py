"""The serving sweep (and, for real-weight models, KL divergence) outside pytest, for the GPU results page:
`python benchmarks/gpu/quality_serving.py --model opt-1.3b --random-weights --techniques bf16,bnb4 ...`.
Writes a JSON of the serving rows per technique and the serving plot (PNG) to --out."""

from __future__ import annotations

import argparse
import gc
import json
import signal
import time
from pathlib import Path
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="opt-1.3b")
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--techniques", default="bf16")
    ap.add_argument("--batch-sizes", default="1,8,32,128")
    ap.add_argument("--input-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--min-window", type=float, default=3.0)
    ap.add_argument("--min-rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cache-dir", type=Path, default=Path(".eff-cache"))
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    from efficiency.data import load_corpus
    from efficiency.models import resolve
    from efficiency.phases.quality_settings import ServingSettings, parse_int_list
    from efficiency.report.serving_plots import serving_plot

    settings = ServingSettings(parse_int_list(a.batch_sizes), a.input_tokens, a.output_tokens)
    source = resolve(a.model, (a.model_dir,), a.random_weights, a.cache_dir)
    corpus = load_corpus("wikitext2", a.data_dir)
    a.out.mkdir(parents=True, exist_ok=True)
    cases: list[dict[str, Any]] = []

    def report(partial: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"cases": cases + ([partial] if partial else []),
                "settings": {**settings.__dict__, "min_window_s": a.min_window}}

    def save(partial: dict[str, Any] | None = None) -> None:
        """The report so far (each batch size as it is measured: an interrupted sweep keeps what it measured)."""
        (a.out / "serving.json").write_text(json.dumps(report(partial), indent=1, default=str))

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_term)
    try:
        sweep(a, settings, source, corpus, cases, save)
    except KeyboardInterrupt as err:
        print(f"[serving] interrupted ({err}): serving.json keeps the batch sizes measured so far", flush=True)
    png = serving_plot(report())
    if png is not None:
        (a.out / "serving.png").write_bytes(png)


def sweep(a: argparse.Namespace, settings: Any, source: Any, corpus: Any, cases: list[dict[str, Any]],
          save: Any) -> None:
    import torch

    from efficiency.config import Workload
    from efficiency.data import tokenize
    from efficiency.measure.meters import select_meters
    from efficiency.measure.timing import make_sync
    from efficiency.models import load
    from efficiency.phases.base import PhaseContext, run_phase
    from efficiency.phases.serving import PREFIX, ServingPhase, serving_row
    from efficiency.techniques.base import Context, parse

    for technique in a.techniques.split(","):
        pipeline = parse(technique)
        probe = Context(a.device, None, a.model, a.cache_dir)
        pipeline.check(probe)
        dtype = pipeline.load_dtype(probe, torch.float16)
        loaded = load(source, a.device, dtype, a.cache_dir)
        ctx_t = Context(a.device, loaded.tokenizer, a.model, a.cache_dir)
        model = pipeline.apply(loaded.model, ctx_t)
        ids = tokenize(corpus, loaded.tokenizer, a.cache_dir)
        meter_set = select_meters(a.device)
        meters = {"gpu": meter_set.gpu, "cpu": meter_set.cpu}
        primary = "gpu" if a.device.startswith("cuda") else "cpu"
        ctx = PhaseContext(case_id=f"{a.model}-{technique}", device=a.device,
                           workload=Workload(min_rounds=a.min_rounds, min_window_s=a.min_window), tokens=ids,
                           tokenizer=loaded.tokenizer, context=1024, stride=1024, meters=meters, primary=primary,
                           sync=make_sync(a.device), log=lambda m: print(f"[serving] {m}", flush=True))
        sizes = sorted(settings.batch_sizes)
        section: dict[str, Any] = {}
        for b in sizes:
            phase = ServingPhase(b, settings, last=b == sizes[-1])
            t0 = time.perf_counter()
            try:
                section.update(phase.section(run_phase(phase, model, ctx), ctx))
            except torch.OutOfMemoryError as err:
                print(f"[serving] {technique} batch {b}: out of memory: {str(err)[:200]}", flush=True)
                break
            print(f"[serving] {technique} batch {b}: {time.perf_counter() - t0:.1f} s", flush=True)
            rows = [serving_row(r, primary) for n, r in ctx.records.items() if n.startswith(PREFIX)]
            save({"id": ctx.case_id, "model": a.model, "technique": technique, "status": "partial",
                  "serving": {"batches": rows, "largest": rows[-1] if rows else None}})
        if "serving" not in section:  # out of memory before the last batch: the rows measured so far
            rows = [serving_row(r, primary) for n, r in ctx.records.items() if n.startswith(PREFIX)]
            section["serving"] = {"batches": rows, "largest": rows[-1] if rows else None}
        for row in section["serving"]["batches"]:
            print(f"[serving] {technique} b={row['batch_size']:4d} tok/s={row['tokens_per_s']:.1f} "
                  f"ttft_ms={1e3 * (row['time_to_first_token_s'] or float('nan')):.2f} "
                  f"tpot_ms={1e3 * (row['time_per_output_token_s'] or float('nan')):.2f} "
                  f"J/tok={row['j_per_token']} rounds={row['rounds']} window_s={row['window_s']:.2f}", flush=True)
        cases.append({"id": ctx.case_id, "model": a.model, "technique": technique, "status": "measured",
                      "random_weights": loaded.source.random_weights,
                      "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu", **section})
        save()
        del model, loaded, ctx
        gc.collect()
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
