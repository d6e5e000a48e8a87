"""Measures one model x technique case: load, apply the technique pipeline, then run the case's phases
(efficiency.phases.plan), each inside its own measured window, and return a typed :class:`CaseResult`.

The pytest plugin and library users both drive this; it knows nothing of pytest apart from accepting
pytest-benchmark's ``benchmark`` fixture for the timed rounds of the perplexity pass.
"""

from __future__ import annotations

import functools
import gc
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efficiency.config import SuiteConfig
from efficiency.data import CALIBRATION_KEY, Corpus, load_calibration_text, load_corpus, tokenize, tokenizer_fingerprint
from efficiency.measure.meters import select_meters
from efficiency.models import LoadedModel, ModelSource, load, max_positions, resolve, skeleton
from efficiency.results import CaseResult, phase_entries
from efficiency.techniques.base import Context, Pipeline, matmul_dtype, parse
from efficiency.techniques.compile import compiled_case_settings, compiled_state, release_compiled_state


class CaseOutOfMemory(Exception):
    """The case ran out of device memory; the message gives the memory figures. The model is already freed."""

    def __init__(self, message: str, figures: dict[str, Any]) -> None:
        super().__init__(message)
        self.figures = figures


@dataclass(frozen=True)
class InterruptedCase:
    """What a case measured before the run was interrupted (Ctrl-C, SIGTERM) in one of its phases: attached to
    the ``KeyboardInterrupt`` itself (:func:`interrupted_case`), which goes on unchanged to pytest, so that the
    report keeps it on an ``interrupted`` case instead of dropping the case whole. ``sections``: the report
    sections of the phases that ended, with ``phases`` (each one's window, rounds and median round) and the
    reasons of optional groups that failed before."""

    phase: str
    phases_done: list[str]
    sections: dict[str, Any]


_INTERRUPTED_ATTR = "efficiency_interrupted_case"


def interrupted_case(err: BaseException) -> InterruptedCase | None:
    """The partial case an interrupt carries, None where it came outside a case's phases."""
    found = getattr(err, _INTERRUPTED_ATTR, None)
    return found if isinstance(found, InterruptedCase) else None


def _stderr_log(msg: str) -> None:
    print(f"[efficiency] {msg}", file=sys.stderr, flush=True)


@dataclass
class Runner:
    cfg: SuiteConfig
    log: Callable[[str], None] = field(default=_stderr_log)
    _corpus: Corpus | None = None
    _calibration: Corpus | None = None
    _tokens: dict[str, Any] = field(default_factory=dict)
    _sources: dict[str, ModelSource] = field(default_factory=dict)
    _stores: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-model state across cases (KL reference)

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
        return load(self.source(name), self.cfg.device, dtype, self.cfg.cache_dir, log=self.log,
                    device_map=self.cfg.device_map)

    def pipeline(self, technique: str) -> Pipeline:
        return parse(technique, self.cfg.technique_options)

    # --- one case -------------------------------------------------------------------------------------
    def measure(self, model_name: str, technique: str, benchmark: Any = None) -> CaseResult:
        """Measure ``technique`` on ``model_name``. Raises the Unavailable errors (the caller turns them into
        skips), :class:`CaseOutOfMemory`, and anything unexpected."""
        import torch

        cfg = self.cfg
        pipeline = self.pipeline(technique)
        source = self.source(model_name)
        default_dtype = torch.float16 if cfg.device.startswith("cuda") else torch.float32
        probe_ctx = self._context(model_name, None, default_dtype)
        pipeline.check(probe_ctx)
        if cfg.device_map:  # techniques that rebuild layers on one device would undo the split
            from efficiency.devices import split_unsupported
            from efficiency.techniques.base import UnsupportedTechnique

            reason = split_unsupported(pipeline.name.split("+"))
            if reason:
                raise UnsupportedTechnique(reason)
        self.corpus()  # fail on missing data before spending time on the model, its skeleton included
        pipeline.check_layers(functools.cache(lambda: skeleton(source, cfg.cache_dir, self.log)))
        dtype = pipeline.load_dtype(probe_ctx, default_dtype)

        case_id = f"{model_name}-{pipeline.name}"
        self.log(f"{case_id}: loading {source.describe()} as {str(dtype).removeprefix('torch.')}")
        model: Any = None
        loaded: LoadedModel | None = None
        oom: dict[str, Any] | None = None
        try:
            with compiled_case_settings():
                loaded = self.load_named(model_name, dtype)
                ctx = self._context(model_name, loaded.tokenizer, dtype)
                t0 = time.perf_counter()
                model = pipeline.apply(loaded.model, ctx)
                apply_s = time.perf_counter() - t0
                return self._measure_loaded(model, loaded, pipeline, ctx, apply_s, benchmark)
        except torch.OutOfMemoryError as err:
            oom = {"error": str(err).splitlines()[0][:300], **_device_memory(cfg.device)}
        finally:
            compiled = compiled_state(model) is not None
            del model, loaded
            if compiled:
                release_compiled_state()
            gc.collect()
            if cfg.device.startswith("cuda"):
                torch.cuda.empty_cache()
        # Raised outside the except block, so that the OOM exception (and the frames holding the model) is gone.
        raise CaseOutOfMemory(f"{case_id}: out of memory: {oom['error']}", oom)

    def _context(self, model_name: str, tokenizer: Any, dtype: Any) -> Context:
        def load_model(name: str) -> Any:
            return self.load_named(name, dtype).model

        def calibration() -> Corpus:
            # The text a technique calibrated on is part of what the case measured: compare tells cases apart by
            # its hash (report.compare.case_identity), not by the file's path, which differs between machines.
            corpus = self.calibration()
            ctx.info[CALIBRATION_KEY] = corpus.sha256
            return corpus

        ctx = Context(
            device=self.cfg.device, tokenizer=tokenizer, model_name=model_name, cache_dir=self.cfg.cache_dir,
            calibration=calibration, load_model=load_model, log=self.log, compute_dtype=self.cfg.compute_dtype,
        )
        return ctx

    def _measure_loaded(
        self, model: Any, loaded: LoadedModel, pipeline: Pipeline, ctx: Context, apply_s: float, benchmark: Any
    ) -> CaseResult:
        from efficiency.devices import model_gpus
        from efficiency.measure.memory import model_size
        from efficiency.measure.timing import make_sync
        from efficiency.phases.base import PhaseContext, run_phase
        from efficiency.phases.plan import case_phases, group_of

        cfg, wl = self.cfg, self.cfg.workload
        case_id = f"{ctx.model_name}-{pipeline.name}"
        ids = self.tokens(loaded.tokenizer)
        context = min(wl.context, max_positions(model.config))
        gpus = model_gpus(model)  # a model split across GPUs (--eff-device-map): metered, synced, tracked on all
        meter_set = select_meters(cfg.device, ordinals=gpus or None)
        syncs = [make_sync(f"cuda:{i}") for i in gpus] if len(gpus) > 1 else [make_sync(cfg.device)]

        def sync_all() -> None:
            for sync in syncs:
                sync()
        meters = {"gpu": meter_set.gpu, "cpu": meter_set.cpu}
        primary = "gpu" if cfg.device.startswith("cuda") else "cpu"
        pctx = PhaseContext(
            case_id=case_id, device=cfg.device, workload=wl, tokens=ids, tokenizer=loaded.tokenizer,
            context=context, stride=min(wl.stride, context), meters=meters, primary=primary,
            sync=sync_all, log=self.log, benchmark=benchmark,
            store=self._stores.setdefault(ctx.model_name, {}), model_name=ctx.model_name,
            is_baseline=pipeline.name == cfg.baseline,
            gpus=tuple(f"cuda:{i}" for i in gpus) if len(gpus) > 1 else (), nvml_indices=meter_set.nvml_indices,
        )
        pctx.shared["matmul_dtype"] = matmul_dtype(ctx.info)
        conditions = case_conditions(meter_set)
        sections: dict[str, dict[str, Any]] = {}
        phases = case_phases(cfg, loaded.source.random_weights)
        failed_groups: dict[str, str] = {}
        for phase in phases:
            group = group_of(phase.name)
            if group is not None and group in failed_groups:
                continue
            try:
                record = run_phase(phase, model, pctx)
                sections.update(phase.section(record, pctx))
            except KeyboardInterrupt as err:
                partial = {**sections, **_group_reasons(failed_groups), "phases": phase_entries(pctx.records)}
                setattr(err, _INTERRUPTED_ATTR, InterruptedCase(phase.name, list(pctx.records), partial))
                raise
            except Exception as err:
                if group is None or _is_oom(err):
                    raise
                # e.g. generation unsupported by a transformed model: say so, keep the rest of the case
                failed_groups[group] = failure_reason(phase.name, err)
                self.log(f"{case_id}: {group} not measured: {failed_groups[group]}; the rest of the case goes on")
                for line in traceback.format_exception(err)[-_TRACEBACK_LINES:]:
                    self.log(f"{case_id}:   {line.rstrip()}")
        conditions["after"] = case_conditions(meter_set, sample_load=False)
        conditions["warnings"] += [w for w in conditions["after"]["warnings"] if w not in conditions["warnings"]]
        sections.update(_group_reasons(failed_groups))
        if benchmark is not None:
            benchmark.extra_info.update(
                perplexity=sections["perplexity"]["value"], energy_j=sections["energy"]["energy_j"],
                peak_bytes=sections["memory"]["peak_bytes"], model=ctx.model_name, technique=pipeline.name)
        return CaseResult(
            id=case_id, model=ctx.model_name, technique=pipeline.name, steps=[s.name for s in pipeline],
            is_baseline=pipeline.name == cfg.baseline, source=loaded.source.describe(),
            random_weights=loaded.source.random_weights, load_s=loaded.load_s, apply_s=apply_s,
            technique_info=dict(ctx.info), records=dict(pctx.records), sections=sections,
            size=model_size(model), model_info=loaded.provenance(), conditions=conditions,
        )


def _group_reasons(failed_groups: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The sections of the optional groups that failed: why, and their figures null."""
    return {group: {"reason": reason, **{k: None for k in _GROUP_KEYS.get(group, ())}}
            for group, reason in failed_groups.items()}


def case_conditions(meter_set: Any, sample_load: bool = True) -> dict[str, Any]:
    """What the case ran under: machine load (CPU share of other processes, load average, threads) and, on a
    GPU, its power state (temperature, SM/memory clocks and their maxima, power limit, throttle reasons);
    ``warnings`` when the machine was busy or the clocks throttled. Taken before and after the phases."""
    from efficiency.devices import placement
    from efficiency.report.env import busy_warning, load_snapshot

    out: dict[str, Any] = {"warnings": list(meter_set.notes)}
    if sample_load:
        out["placement"] = placement(meter_set)
        out["load"] = load_snapshot()
        warning = busy_warning(out["load"])
        if warning:
            out["warnings"].append(warning)
    if meter_set.nvml_indices:
        from efficiency.measure.gpustate import power_state

        out["gpu"] = power_state(meter_set.nvml_indices)
        if out["gpu"].get("warning"):
            out["warnings"].append(out["gpu"]["warning"])
    return out


_GROUP_KEYS = {"latency": ("prefill_s", "first_token_s", "decode_s_per_token", "decode_j_per_token")}


_TRACEBACK_LINES = 12  # lines of a failed phase group's traceback shown in the log (its innermost frames)


def failure_reason(phase_name: str, err: BaseException) -> str:
    """A report's reason for a phase group that failed: the phase, the error and where it was raised (its innermost
    frame), so that an error without a message (a bare ``assert`` deep in a library) still says what failed."""
    frames = traceback.extract_tb(err.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        where = f" (raised at {'/'.join(Path(last.filename).parts[-2:])}:{last.lineno} in {last.name})"
    return f"{phase_name}: {type(err).__name__}: {str(err) or '(no message)'}{where}"


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError)


def _device_memory(device: str) -> dict[str, Any]:
    """Memory figures at the time of an out-of-memory error (peak and capacity on CUDA)."""
    if not device.startswith("cuda"):
        return {}
    import torch

    dev = torch.device(device)
    try:
        free, total = torch.cuda.mem_get_info(dev)
    except RuntimeError:
        free, total = None, None
    return {"peak_allocated_bytes": int(torch.cuda.max_memory_allocated(dev)),
            "reserved_bytes": int(torch.cuda.memory_reserved(dev)), "free_bytes": free, "total_bytes": total}
