"""Does distillation recover a pruned SmolLM2-135M? WikiText-2 *test* perplexity of the original model, of
each student right after pruning (no training) and after distillation from the original; plus training cost.

    python benchmarks/recover_smollm2.py --device cuda --tokens 200000            # the GPU check
    python benchmarks/recover_smollm2.py --device cpu --tokens 2048 --eval-tokens 2048 \\
        --seq-len 128 --batch-size 2 --heldout-tokens 512                          # CPU smoke run

Training and the pruning importance use WikiText-2 *validation* (non-raw) text; the held-out numbers that the
technique reports come from the tail of that text; only the final table uses the test split. Students are
cached under --cache-dir, so a second run with the same settings reports the cached training cost.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=200_000, help="training budget per technique (tokens)")
    p.add_argument("--technique", action="append", help="repeatable; default: distil-d50 and minitron-w25")
    p.add_argument("--eval-tokens", type=int, default=None, help="WikiText-2 test prefix (default: all)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--heldout-tokens", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=Path("/work/shared/data"))
    p.add_argument("--cache-dir", type=Path, default=Path(".eff-cache"), help="students and token ids")
    p.add_argument("--model-cache-dir", type=Path, default=Path(".eff-cache"), help="where smollm2 lives")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from efficiency import smollm2
    from efficiency.data import load_calibration_text, load_corpus, tokenize
    from efficiency.measure.perplexity import PerplexityEvaluator
    from efficiency.techniques.base import Context, parse_one
    from efficiency.techniques.distil import KdSettings, count_params, plan_data

    folder = smollm2.ensure_dequantised(args.model_cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(args.device).eval()
    test_ids = tokenize(load_corpus("wikitext2", args.data_dir), tokenizer, args.cache_dir)
    evaluator = PerplexityEvaluator(test_ids[: args.eval_tokens], 512, 512, 4)

    def test_ppl(m: Any) -> float:
        return evaluator.run(m, args.device).perplexity

    def make_ctx() -> Context:
        return Context(args.device, tokenizer, "smollm2-135m", args.cache_dir, seed=args.seed,
                       calibration=lambda: load_calibration_text(None, args.data_dir))

    settings = KdSettings(tokens=args.tokens, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                          heldout_tokens=args.heldout_tokens)
    original = test_ppl(model)
    results: dict[str, Any] = {
        "model": "smollm2-135m", "device": args.device, "params": count_params(model),
        "eval": {"split": "wikitext2-raw-test", "n_scored_tokens": evaluator.n_scored_tokens, "context": 512,
                 "stride": 512},
        "original_test_ppl": original, "techniques": {},
    }
    print(f"original: {count_params(model):,} params, WikiText-2 test ppl {original:.2f}", file=sys.stderr)
    for name in args.technique or ["distil-d50", "minitron-w25"]:
        technique: Any = dataclasses.replace(parse_one(name), settings=settings)  # type: ignore[type-var]
        ctx = make_ctx()
        train = plan_data(ctx, model, settings, args.seed).load().train
        pruned, _ = technique.make_student(copy.deepcopy(model), train, args.device)
        pruned_ppl = test_ppl(pruned)
        del pruned
        t0 = time.perf_counter()
        student = technique.apply(model, ctx)
        wall_s = time.perf_counter() - t0
        info = ctx.info[technique.name]
        row = {
            "params_student": info["params_student"], "test_ppl_pruned": pruned_ppl,
            "test_ppl_recovered": test_ppl(student), "apply_wall_s": wall_s, "cache": info["cache"],
            "training": {k: info["training"][k] for k in ("steps", "tokens", "loss_step0", "loss_final",
                                                          "time_s")},
            "training_energy_j": info["training"]["energy"]["energy_j"],
            "training_energy_note": info["training"]["energy"]["reason"],
            "heldout_calibration": info["heldout"], "structure": info["structure"],
        }
        results["techniques"][technique.name] = row
        del student
        print(json.dumps({technique.name: row}, indent=1, default=str), file=sys.stderr)
    print(f"\n{'technique':<16}{'params':>13}{'ppl original':>14}{'pruned':>14}{'recovered':>11}"
          f"{'train s':>9}{'tokens':>10}{'train J':>10}")
    for name, row in results["techniques"].items():
        energy = row["training_energy_j"]
        print(f"{name:<16}{row['params_student']:>13,}{original:>14.2f}{row['test_ppl_pruned']:>14.2f}"
              f"{row['test_ppl_recovered']:>11.2f}{row['training']['time_s']:>9.1f}{row['training']['tokens']:>10}"
              f"{'n/a' if energy is None else f'{energy:.0f}':>10}")
    print(f"(WikiText-2 raw test, {evaluator.n_scored_tokens} scored tokens, context 512 / stride 512; "
          f"training data: WikiText-2 validation; device {args.device})")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
