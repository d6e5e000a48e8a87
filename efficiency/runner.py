"""Measures one model x technique case: load, apply, perplexity, timed rounds inside an energy window,
latency, memory and size. The pytest plugin and library users both drive this; it knows nothing of pytest
apart from accepting pytest-benchmark's ``benchmark`` fixture for the timed rounds.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efficiency.config import SuiteConfig
from efficiency.data import Corpus, load_calibration_text, load_corpus, tokenize, tokenizer_fingerprint
from efficiency.models import LoadedModel, ModelSource, load, resolve
from efficiency.techniques.base import Context, Pipeline, parse

MAX_ROUNDS = 1000
RANDOM_PPL_REASON = "random weights: the perplexity of an untrained model is meaningless (architecture timing only)"


@dataclass
class Runner:
    cfg: SuiteConfig
    log: Callable[[str], None] = field(default=lambda msg: print(f"[efficiency] {msg}", file=sys.stderr, flush=True))
    _corpus: Corpus | None = None
    _calibration: Corpus | None = None
    _tokens: dict[str, Any] = field(default_factory=dict)
    _sources: dict[str, ModelSource] = field(default_factory=dict)

    # --- inputs, loaded once per session -------------------------------------------------------------
    def source(self, model_name: str) -> ModelSource:
        if model_name not in self._sources:
            self._sources[model_name] = resolve(
                model_name, self.model_dirs(), self.cfg.random_weights, self.cfg.cache_dir
            )
        return self._sources[model_name]

    def model_dirs(self) -> tuple[Path, ...]:
        return (self.cfg.model_dir,) if self.cfg.model_dir else ()

    def corpus(self) -> Corpus:
        if self._corpus is None:
            self._corpus = load_corpus(self.cfg.workload.dataset, self.cfg.data_dir)
        return self._corpus

    def calibration(self) -> Corpus:
        if self._calibration is None:
            self._calibration = load_calibration_text(self.cfg.calibration_path, self.cfg.data_dir)
        return self._calibration

    def tokens(self, tokenizer: Any) -> Any:
        key = tokenizer_fingerprint(tokenizer)
        if key not in self._tokens:
            self._tokens[key] = tokenize(self.corpus(), tokenizer, self.cfg.cache_dir)
        ids = self._tokens[key]
        return ids[: self.cfg.workload.max_tokens] if self.cfg.workload.max_tokens else ids

    def load_named(self, name: str, dtype: Any) -> LoadedModel:
        return load(self.source(name), self.cfg.device, dtype, self.cfg.cache_dir)

    # --- one case -------------------------------------------------------------------------------------
    def measure(self, model_name: str, technique: str, benchmark: Any = None) -> dict[str, Any]:
        """Measure ``technique`` on ``model_name``. Raises ModelUnavailable, DataUnavailable,
        UnsupportedTechnique (the caller turns them into skips) and anything unexpected."""
        import torch

        cfg = self.cfg
        pipeline: Pipeline = parse(technique)
        source = self.source(model_name)
        default_dtype = torch.float16 if cfg.device.startswith("cuda") else torch.float32
        probe_ctx = self._context(model_name, None, default_dtype)
        pipeline.check(probe_ctx)
        dtype = pipeline.load_dtype(probe_ctx, default_dtype)
        self.corpus()  # fail on missing data before spending time on the model

        self.log(f"{model_name}-{technique}: loading {source.describe()} as {str(dtype).removeprefix('torch.')}")
        loaded = self.load_named(model_name, dtype)
        ctx = self._context(model_name, loaded.tokenizer, dtype)
        t0 = time.perf_counter()
        model = pipeline.apply(loaded.model, ctx)
        apply_s = time.perf_counter() - t0
        try:
            return self._measure_loaded(model, loaded, pipeline, ctx, apply_s, benchmark)
        finally:
            del model, loaded
            gc.collect()
            if cfg.device.startswith("cuda"):
                torch.cuda.empty_cache()

    def _context(self, model_name: str, tokenizer: Any, dtype: Any) -> Context:
        def teacher() -> Any:
            return self.load_named(model_name, dtype).model

        def load_model(name: str) -> Any:
            return self.load_named(name, dtype).model

        return Context(
            device=self.cfg.device, tokenizer=tokenizer, model_name=model_name, cache_dir=self.cfg.cache_dir,
            calibration=self.calibration, teacher=teacher, load_model=load_model,
            compute_dtype=self.cfg.compute_dtype, students=self.cfg.students,
        )

    def _measure_loaded(
        self, model: Any, loaded: LoadedModel, pipeline: Pipeline, ctx: Context, apply_s: float, benchmark: Any
    ) -> dict[str, Any]:
        from efficiency.measure.energy import NullMeter, measure_energy, select_cpu_meter, select_gpu_meter
        from efficiency.measure.memory import model_size, track_peak
        from efficiency.measure.perplexity import PerplexityEvaluator
        from efficiency.measure.timing import make_sync, measure_latency, timed

        cfg, wl = self.cfg, self.cfg.workload
        name = f"{ctx.model_name}-{pipeline.name}"
        ids = self.tokens(loaded.tokenizer)
        context = min(wl.context, _max_positions(model.config))
        stride = min(wl.stride, context)
        evaluator = PerplexityEvaluator(ids, context, stride, wl.batch_size)
        sync = make_sync(cfg.device)

        self.log(f"{name}: perplexity pass over {len(ids)} tokens ({len(evaluator.plan)} windows of {context})")
        with track_peak(cfg.device) as peak:
            sync()
            t0 = time.perf_counter()
            ppl = evaluator.run(model, cfg.device)
            sync()
            first_s = time.perf_counter() - t0

        gpu_meter = (select_gpu_meter([_cuda_index(cfg.device)]) if cfg.device.startswith("cuda")
                     else NullMeter("no GPU: the run is on the CPU"))
        cpu_meter = select_cpu_meter()
        primary = gpu_meter if cfg.device.startswith("cuda") else cpu_meter
        window = wl.min_window_s if not isinstance(primary, NullMeter) else 0.0
        pass_s = first_s
        if window > 0:  # the first pass carries one-time costs (kernel loading, autotuning): time a warm one
            pass_s = timed(lambda: evaluator.run(model, cfg.device), sync)
        rounds = min(MAX_ROUNDS, max(wl.min_rounds, math.ceil(window / max(pass_s, 1e-6))))
        round_s: list[float] = []

        def one_round() -> None:
            t = time.perf_counter()
            evaluator.run(model, cfg.device)  # synchronises: .item() waits for the result
            sync()
            round_s.append(time.perf_counter() - t)

        self.log(f"{name}: {rounds} timed rounds (energy window >= {window:g} s)")
        with measure_energy(gpu_meter, sync) as gpu_w, measure_energy(cpu_meter, sync) as cpu_w:
            start = time.perf_counter()
            if benchmark is not None:
                benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
            else:
                for _ in range(rounds):
                    one_round()
            # Rounds ran faster than the warm estimate: extend the window until it is long enough.
            while window > 0 and time.perf_counter() - start < window and len(round_s) < MAX_ROUNDS:
                one_round()
        n_rounds = len(round_s)  # pytest-benchmark with --benchmark-disable runs once
        energy = _energy_section(gpu_w.sample, cpu_w.sample, n_rounds, ppl.n_scored_tokens, cfg.device)

        latency: dict[str, Any]
        prompt = ids[: min(wl.prefill_tokens, context)].unsqueeze(0)
        try:
            lat = measure_latency(model, prompt, wl.decode_tokens, cfg.device, wl.min_rounds,
                                  loaded.tokenizer.pad_token_id)
            latency = lat.to_dict()
        except Exception as err:  # generation unsupported by a transformed model: say so, keep the rest
            latency = {"prefill_s": None, "decode_s_per_token": None, "reason": f"{type(err).__name__}: {err}"}

        median_s = statistics.median(round_s)
        result = {
            "id": name,
            "model": ctx.model_name,
            "technique": pipeline.name,
            "steps": [s.name for s in pipeline],
            "is_baseline": pipeline.name == cfg.baseline,
            "status": "measured",
            "source": loaded.source.describe(),
            "random_weights": loaded.source.random_weights,
            "load_s": loaded.load_s,
            "apply_s": apply_s,
            "technique_info": _jsonable(ctx.info),
            "perplexity": {
                "value": ppl.perplexity,
                "meaningful": not loaded.source.random_weights,
                "reason": RANDOM_PPL_REASON if loaded.source.random_weights else None,
                **ppl.to_dict(),
            },
            "runtime": {
                "median_s": median_s,
                "min_s": min(round_s),
                "rounds_s": round_s,
                "rounds": n_rounds,
                "first_pass_s": first_s,
                "tokens_per_s": ppl.n_tokens / median_s if median_s > 0 else None,
                "method": "perplexity pass; perf_counter with device sync at both edges; median of rounds "
                          "after one untimed pass",
            },
            "latency": latency,
            "energy": energy,
            "memory": peak.to_dict(),
            "size": model_size(model).to_dict(),
        }
        if benchmark is not None:
            benchmark.extra_info.update(perplexity=ppl.perplexity, energy_j=energy["energy_j"],
                                        peak_bytes=peak.peak_bytes, model=ctx.model_name, technique=pipeline.name)
        return result


def _max_positions(config: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30


def _cuda_index(device: str) -> int:
    import torch

    return torch.device(device).index or 0


def _energy_section(gpu: Any, cpu: Any, rounds: int, scored: int, device: str) -> dict[str, Any]:
    """Per-pass energy from the window readings. ``energy_j`` is the primary figure the score uses: the GPU's
    on a GPU run, the CPU package's on a CPU run; null with the reason when that meter is unavailable."""

    def per_pass(sample: Any) -> dict[str, Any]:
        if sample is None:
            return {"energy_j": None, "reason": "measurement window was cancelled"}
        d = sample.to_dict()
        d["window_energy_j"] = d.pop("energy_j")
        d["window_uncertainty_j"] = d.pop("uncertainty_j")
        d["rounds_in_window"] = rounds
        d["energy_j"] = d["window_energy_j"] / rounds if d["window_energy_j"] is not None else None
        d["uncertainty_j"] = d["window_uncertainty_j"] / rounds if d["window_uncertainty_j"] is not None else None
        return d

    g, c = per_pass(gpu), per_pass(cpu)
    primary = g if device.startswith("cuda") else c
    energy_j = primary["energy_j"]
    return {
        "energy_j": energy_j,
        "uncertainty_j": primary.get("uncertainty_j"),
        "j_per_token": energy_j / scored if energy_j is not None else None,
        "primary": "gpu" if device.startswith("cuda") else "cpu",
        "reason": primary.get("reason") if energy_j is None else None,
        "gpu": g,
        "cpu": c,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
