"""State of one run: the runner, the baselines measured once per model, the report written after every case.

A case's outcome: measured (deltas, scores, threshold verdict), skipped (model, data or technique not available
here, with the reason) or error. The report is rewritten atomically after each case with status ``running``,
and finally ``complete`` / ``interrupted`` / ``failed``, so an interrupted run leaves a readable report.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from efficiency.config import SuiteConfig
from efficiency.report.schema import new_report, now_iso
from efficiency.score import CONVENTION, case_deltas, case_scores, pareto_front


@dataclass
class EfficiencySession:
    cfg: SuiteConfig
    root: Path
    quiet: bool = False
    report: dict[str, Any] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)
    _runner: Any = None
    _baselines: dict[str, dict[str, Any] | BaseException] = field(default_factory=dict)
    _path: Path | None = None
    worker_output: dict[str, Any] | None = None  # set on a pytest-xdist worker: cases go to the controller

    @property
    def runner(self) -> Any:
        if self._runner is None:
            from efficiency.runner import Runner

            self._runner = Runner(self.cfg, log=self._log)
        return self._runner

    def _log(self, msg: str) -> None:
        if not self.quiet:
            print(f"\n[efficiency] {msg}", file=sys.__stderr__, flush=True)

    # --- report ----------------------------------------------------------------------------------------
    def _ensure_report(self) -> None:
        if self.report:
            return
        from efficiency.report.env import capture

        self.report = new_report(capture(self.root, self.cfg.device), self.settings())

    def settings(self) -> dict[str, Any]:
        wl, cfg = self.cfg.workload, self.cfg
        return {
            "models": list(cfg.models), "techniques": list(cfg.techniques), "baseline": cfg.baseline,
            "device": cfg.device, "random_weights": cfg.random_weights,
            "workload": {**wl.__dict__},
            "thresholds": {"default_pct": cfg.thresholds.default_pct, **dict(cfg.thresholds.per_technique)},
            "model_dir": str(cfg.model_dir) if cfg.model_dir else None,
            "data_dir": str(cfg.data_dir) if cfg.data_dir else None,
            "score_convention": CONVENTION,
        }

    def _write(self) -> None:
        from efficiency.report.io import next_report_path, write_atomic

        if self._path is None:
            git = self.report["environment"]["git"]
            self._path = next_report_path(self.cfg.reports_dir, git.get("commit"), bool(git.get("dirty")))
        targets = [self._path] + ([self.cfg.report_path] if self.cfg.report_path else [])
        for path in targets:
            write_atomic(path, self.report)
        self.written = targets

    def _record(self, case: dict[str, Any]) -> None:
        self._ensure_report()
        self.report["cases"].append(case)
        if self.worker_output is None:
            self._write()

    def merge_worker_cases(self, cases_json: str) -> None:
        """On the xdist controller: add the cases a worker measured (sent as JSON when the worker finished)."""
        import json

        cases = json.loads(cases_json)
        if cases:
            self._ensure_report()
            self.report["cases"].extend(cases)
            self._write()

    def finish(self, exitstatus: int) -> None:
        if not self.report:
            return
        if self.worker_output is not None:  # the controller writes the one report of the run
            import json

            self.worker_output["efficiency_cases"] = json.dumps(self.report["cases"])
            return
        from efficiency.plugin import grid

        order = {(c.model, c.technique): i for i, c in enumerate(grid(self.cfg))}
        self.report["cases"].sort(key=lambda c: order.get((c["model"], c["technique"]), len(order)))
        status = {0: "complete", 1: "complete", 2: "interrupted", 5: "complete"}.get(int(exitstatus), "failed")
        self.report["status"] = status
        self.report["finished_at"] = now_iso()
        _mark_pareto(self.report["cases"])
        self.report["violations"] = [v for c in self.report["cases"] if (v := c.get("threshold", {}).get("violation"))]
        self._write()

    # --- cases -----------------------------------------------------------------------------------------
    def _skip_or_fail(self, case_id: str, model: str, technique: str, err: BaseException) -> None:
        reason = f"{type(err).__name__}: {err}"
        strict = self.cfg.strict and isinstance(err, self._skip_types())
        self._record({"id": case_id, "model": model, "technique": technique, "status": "error" if strict else "skipped",
                      "reason": reason})
        if strict:
            pytest.fail(f"{case_id}: {reason} (--eff-strict)", pytrace=False)
        pytest.skip(f"{case_id}: {reason}")

    def baseline(self, model: str) -> dict[str, Any]:
        """The model's baseline case, measured once (without pytest-benchmark if no baseline test ran first)."""
        if model not in self._baselines:
            try:
                self._baselines[model] = self.runner.measure(model, self.cfg.baseline)
            except Exception as err:
                self._baselines[model] = err
        result = self._baselines[model]
        if isinstance(result, BaseException):
            raise result
        return result

    def run_case(self, model: str, technique: str, benchmark: Any = None) -> dict[str, Any]:
        from efficiency.techniques.base import UnsupportedTechnique

        case_id = f"{model}-{technique}"
        expected: tuple[type[Exception], ...] = (UnsupportedTechnique, *self._skip_types())
        try:
            if technique == self.cfg.baseline:
                if model not in self._baselines:
                    self._baselines[model] = self.runner.measure(model, technique, benchmark)
                result = self.baseline(model)
                base = result
            else:
                try:
                    base = self.baseline(model)
                except expected as err:
                    raise type(err)(f"baseline {self.cfg.baseline} unavailable: {err}") from err
                result = self.runner.measure(model, technique, benchmark)
        except expected as err:
            self._skip_or_fail(case_id, model, technique, err)
            raise AssertionError("unreachable") from err
        except Exception as err:
            self._record({"id": case_id, "model": model, "technique": technique, "status": "error",
                          "reason": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]})
            raise
        return self._judge(dict(result), base)

    def _skip_types(self) -> tuple[type[Exception], ...]:
        from efficiency.data import DataUnavailable
        from efficiency.models import ModelUnavailable
        from efficiency.smollm2 import FetchError

        return (ModelUnavailable, DataUnavailable, FetchError)

    def _judge(self, result: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        from efficiency.gate import check_perplexity

        technique = result["technique"]
        result["baseline"] = {
            "technique": base["technique"], "perplexity": base["perplexity"]["value"],
            "runtime_s": base["runtime"]["median_s"], "energy_j": base["energy"]["energy_j"],
        }
        result["deltas"] = case_deltas(result, base)
        result["scores"] = case_scores(result["deltas"])
        limit = self.cfg.thresholds.limit_for(technique)
        threshold: dict[str, Any] = {"limit_pct": limit, "checked": False, "passed": None, "violation": None}
        if result["is_baseline"]:
            threshold["reason"] = "baseline case"
        elif not result["perplexity"]["meaningful"]:
            threshold["reason"] = result["perplexity"]["reason"]
        else:
            violation = check_perplexity(result["id"], technique, result["perplexity"]["value"],
                                         base["perplexity"]["value"], self.cfg.baseline, limit)
            threshold.update(checked=True, passed=violation is None,
                             violation=violation.to_dict() if violation else None)
        result["threshold"] = threshold
        self._record(result)
        if threshold["violation"]:
            pytest.fail(threshold["violation"]["message"], pytrace=False)
        return result


def _mark_pareto(cases: list[dict[str, Any]]) -> None:
    """Per model, flag cases not dominated in (perplexity if meaningful, runtime, energy if measured for all)."""
    measured = [c for c in cases if c.get("status") == "measured"]
    for model in {c["model"] for c in measured}:
        group = [c for c in measured if c["model"] == model]
        use_ppl = all(c["perplexity"]["meaningful"] for c in group)
        use_energy = all(c["energy"]["energy_j"] is not None for c in group)
        points = [
            ([c["perplexity"]["value"]] if use_ppl else []) + [c["runtime"]["median_s"]]
            + ([c["energy"]["energy_j"]] if use_energy else [])
            for c in group
        ]
        axes = (["perplexity"] if use_ppl else []) + ["runtime_s"] + (["energy_j"] if use_energy else [])
        for c, flag in zip(group, pareto_front(points), strict=True):
            c["pareto"] = {"on_front": flag, "axes": axes}
