"""State of one run: the runner, the baselines measured once per model, the report written after every case.

A case's outcome (``status`` in the report): ``measured`` (deltas, scores, threshold verdict), ``skipped``
(model, data or technique not available here, with the reason), ``error``, ``invalid`` (a number that must be
finite was not, e.g. a NaN perplexity: no score, the test and the gate fail), ``oom`` (out of device memory,
with the memory figures; the model is freed before the next case) or ``interrupted`` (the run was interrupted
in one of the case's phases: ``partial`` holds the sections its earlier phases measured, ``phases_done`` names
them; no score, never compared). The report is rewritten atomically after
each case with status ``running`` and finally ``complete`` / ``incomplete`` (stopped early: ``-x``,
``--maxfail``, a selected case never ended, e.g. its pytest-xdist worker died; ``missing`` names those cases) /
``interrupted`` / ``failed``; only ``complete`` runs are ever a baseline.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from efficiency.config import SuiteConfig
from efficiency.errors import Unavailable
from efficiency.report.schema import new_report, now_iso
from efficiency.results import unmeasured_case
from efficiency.score import CONVENTION, case_deltas, case_scores, pareto_flags
from efficiency.techniques.options import recorded_options

if TYPE_CHECKING:  # the runner imports torch: the session imports it where a case runs
    from efficiency.runner import InterruptedCase

IDLE_SECONDS = 5.0  # idle-power reading per run (only where a real meter reads the primary energy)


@dataclass(frozen=True)
class _Failed:
    """A baseline that could not be measured: its error type and message (never the exception and its frames,
    which would keep the model alive)."""

    kind: type[BaseException]
    message: str
    skip: bool
    figures: dict[str, Any] = field(default_factory=dict)  # memory figures of an out-of-memory failure


@dataclass
class EfficiencySession:
    cfg: SuiteConfig
    root: Path
    quiet: bool = False
    log: Callable[[str], None] | None = None
    report: dict[str, Any] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)
    write_errors: list[str] = field(default_factory=list)
    fallback_path: Path | None = None  # where the report went when a target could not be written
    expected: set[str] = field(default_factory=set)  # case ids collected for this run (set by the plugin)
    started_at: str = field(default_factory=now_iso)
    shard: tuple[int, int] | None = None  # --eff-shard I/N: this run measures shard I of N of the grid
    _runner: Any = None
    _baselines: dict[str, dict[str, Any] | _Failed] = field(default_factory=dict)
    _path: Path | None = None
    worker_output: dict[str, Any] | None = None  # set on a pytest-xdist worker: cases go to the controller
    outbox: list[dict[str, Any]] = field(default_factory=list)  # worker: cases not yet sent to the controller

    @property
    def runner(self) -> Any:
        if self._runner is None:
            from efficiency.runner import Runner

            self._runner = Runner(self.cfg, log=self._log)
        return self._runner

    def _log(self, msg: str) -> None:
        if self.quiet:
            return
        if self.log is not None:
            self.log(msg)
        else:
            print(f"\n[efficiency] {msg}", file=sys.__stderr__, flush=True)

    def expect(self, case_ids: Iterable[str]) -> None:
        self.expected = set(case_ids)

    # --- report ----------------------------------------------------------------------------------------
    def _ensure_report(self, idle_power: dict[str, Any] | None = None) -> None:
        """Start the report (environment, settings, start time) once. ``idle_power``: what to record instead
        of reading it (the xdist controller may not read while its workers measure)."""
        if self.report:
            return
        from efficiency.report.env import capture

        self.report = new_report(capture(self.root, self.cfg.device), self.settings())
        self.report["started_at"] = self.started_at
        self.report["environment"]["idle_power"] = idle_power or self._idle_power()

    def _idle_power(self) -> dict[str, Any]:
        """The primary meter's idle power, once per run before the first case, so that reports give net energy
        (gross minus idle power x time) next to gross."""
        from efficiency.measure.meters import idle_power_w, select_meters

        try:
            return idle_power_w(select_meters(self.cfg.device), IDLE_SECONDS).to_dict()
        except Exception as err:  # never lose a run to the idle reading
            return {"power_w": None, "reason": f"idle power not measured: {type(err).__name__}: {err}"}

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
            # what the techniques and optional phases ran with: merge refuses shards that differ in them, compare
            # refuses cases they make different (efficiency.report.compare: RUN_SETTINGS, case_identity, the
            # metrics' workload_keys)
            "compute_dtype": cfg.compute_dtype,
            "technique_options": recorded_options(cfg.technique_options),
            "calibration_path": str(cfg.calibration_path) if cfg.calibration_path else None,
            "device_map": cfg.device_map,
            "kld": cfg.kld.to_dict(), "tasks": cfg.tasks.to_dict(), "serving": cfg.serving.to_dict(),
            "accuracy_thresholds": dict(cfg.tasks.thresholds),
            **({"shard": {"index": self.shard[0], "count": self.shard[1]}} if self.shard else {}),
        }

    def _write(self) -> None:
        """Rewrite the report to every target; a target that fails does not stop the run: the report goes to a
        fallback file as well, and the session ends non-zero naming both (``write_failures``)."""
        from efficiency.report.io import reserve_report_path, write_with_fallback

        if self._path is None:
            git = self.report["environment"]["git"]
            try:
                self._path = reserve_report_path(self.cfg.reports_dir, git.get("commit"), bool(git.get("dirty")))
            except OSError as err:
                self.write_errors.append(f"could not create a report in {self.cfg.reports_dir}: {err}")
                self._path = None
        targets = ([self._path] if self._path else []) + ([self.cfg.report_path] if self.cfg.report_path else [])
        written, failed, fallback = write_with_fallback(targets, self.report, self.fallback_path)
        for path, error in failed:
            message = f"could not write the report to {path}: {error}"
            if message not in self.write_errors:
                self.write_errors.append(message)
        if fallback is not None:
            self.fallback_path = fallback
            written.append(fallback)
        self.written = written

    def _record(self, case: dict[str, Any]) -> None:
        self._ensure_report()
        self.report["cases"].append(case)
        if self.worker_output is None:
            self._write()
        else:
            self.outbox.append(case)

    def take_outbox(self) -> list[dict[str, Any]]:
        """On a pytest-xdist worker: the cases recorded since the last call (the plugin sends them with the test
        report, so that the controller has them even if this worker is interrupted or dies later)."""
        cases, self.outbox = self.outbox, []
        return cases

    def merge_worker_cases(self, cases_json: str) -> None:
        """On the xdist controller: add the cases a worker sent (JSON: with a test report as each case ended, and
        again all of them when the worker finished). A case already here is kept, unless it is the record of a
        worker that died running it: a replacement worker's result takes its place."""
        import json

        cases: list[dict[str, Any]] = json.loads(cases_json)
        if not cases:
            return
        self._ensure_report()
        here = {c["id"]: i for i, c in enumerate(self.report["cases"])}
        added = False
        for case in cases:
            i = here.get(case["id"])
            if i is None:
                here[case["id"]] = len(self.report["cases"])
                self.report["cases"].append(case)
            elif self.report["cases"][i].get("worker_crash") and not case.get("worker_crash"):
                self.report["cases"][i] = {**case, "after_worker_crash": self.report["cases"][i]["worker_crash"]}
            else:
                continue
            added = True
        if added:
            self._write()

    def record_crash(self, case_id: str, model: str, technique: str, message: str) -> None:
        """On the xdist controller: a worker died while running this case (killed, e.g. by the out-of-memory
        killer). The case is an ``error`` that never ended, so the run cannot be ``complete``; a case the worker
        had already sent (it died after the case ended) is kept."""
        self._ensure_report()
        if any(c["id"] == case_id for c in self.report["cases"]):
            return
        reason = (f"{message}: the worker process died before the case ended (killed by a signal, e.g. the "
                  "out-of-memory killer); not measured")
        self.report["cases"].append(unmeasured_case(case_id, model, technique, "error", reason,
                                                    worker_crash=message))
        self._write()

    def missing(self) -> list[str]:
        """The expected cases without a report case of their own: never ran, their worker died running them, or a
        pytest-xdist worker was interrupted in them (without xdist an interrupted case is recorded, status
        ``interrupted``)."""
        done = {c["id"] for c in self.report.get("cases") or [] if not c.get("worker_crash")}
        return sorted(self.expected - done)

    def run_status(self, exitstatus: int, stopped_early: bool = False) -> str:
        if int(exitstatus) == 2:
            return "interrupted"
        if int(exitstatus) not in (0, 1, 5):
            return "failed"
        if stopped_early or self.missing():
            return "incomplete"
        return "complete"

    def finish(self, exitstatus: int, stopped_early: bool = False) -> None:
        if not self.report and self.run_status(exitstatus) == "interrupted" and self.worker_output is None:
            # interrupted before its first case ended: a report says so (settings, environment, no cases), not silence
            self._ensure_report(idle_power={"power_w": None, "reason": "not measured: the run was interrupted "
                                            "before its first case ended"})
        if not self.report:
            return
        if self.worker_output is not None:  # the controller writes the one report of the run
            import json

            self.worker_output["efficiency_cases"] = json.dumps(self.report["cases"])
            return
        from efficiency.plugin import grid

        order = {(c.model, c.technique): i for i, c in enumerate(grid(self.cfg))}
        self.report["cases"].sort(key=lambda c: order.get((c["model"], c["technique"]), len(order)))
        self.report["status"] = self.run_status(exitstatus, stopped_early)
        missing = self.missing()
        if missing:
            self.report["missing"] = missing
        if self.expected:  # what the run selected: a comparison leaves out baseline cases outside it, never lost ones
            self.report["selected"] = sorted(self.expected)
        self.report["finished_at"] = now_iso()
        _mark_pareto(self.report["cases"])
        self.report["violations"] = [
            v for c in self.report["cases"] for v in
            ([c["threshold"]["violation"]] if (c.get("threshold") or {}).get("violation") else [])
            + list((c.get("threshold") or {}).get("accuracy_violations") or [])]
        self._write()

    # --- cases -----------------------------------------------------------------------------------------
    def _not_measured(self, case_id: str, model: str, technique: str, err: BaseException | _Failed) -> None:
        kind = err.kind if isinstance(err, _Failed) else type(err)
        message = err.message if isinstance(err, _Failed) else str(err)
        skip = err.skip if isinstance(err, _Failed) else isinstance(err, Unavailable)
        reason = f"{kind.__name__}: {message}"
        from efficiency.runner import CaseOutOfMemory

        if issubclass(kind, CaseOutOfMemory):
            figures = err.figures if isinstance(err, (_Failed, CaseOutOfMemory)) else {}
            self._record(unmeasured_case(case_id, model, technique, "oom", reason, memory=figures))
            pytest.fail(f"{case_id}: {reason}", pytrace=False)
        strict = self.cfg.strict and skip
        status = "skipped" if skip and not strict else "error"
        self._record(unmeasured_case(case_id, model, technique, status, reason))
        if status == "skipped":
            pytest.skip(f"{case_id}: {reason}")
        pytest.fail(f"{case_id}: {reason}" + (" (--eff-strict)" if strict else ""), pytrace=False)

    def _measure_baseline(self, model: str, benchmark: Any = None) -> dict[str, Any] | _Failed:
        if model not in self._baselines:
            try:
                self._baselines[model] = self.runner.measure(model, self.cfg.baseline, benchmark).to_dict()
            except Exception as err:
                from efficiency.runner import CaseOutOfMemory

                figures = err.figures if isinstance(err, CaseOutOfMemory) else {}
                self._baselines[model] = _Failed(type(err), str(err), isinstance(err, Unavailable), figures)
        return self._baselines[model]

    def run_case(self, model: str, technique: str, benchmark: Any = None) -> dict[str, Any]:
        case_id = f"{model}-{technique}"
        try:
            base = self._measure_baseline(model, benchmark if technique == self.cfg.baseline else None)
            if isinstance(base, _Failed):
                if technique == self.cfg.baseline:
                    self._not_measured(case_id, model, technique, base)
                why = _Failed(base.kind, f"baseline {self.cfg.baseline} unavailable: {base.message}", base.skip,
                              base.figures)
                self._not_measured(case_id, model, technique, why)
                raise AssertionError("unreachable")
            if technique == self.cfg.baseline:
                result = dict(base)
            else:
                result = self.runner.measure(model, technique, benchmark).to_dict()
        except (pytest.skip.Exception, pytest.fail.Exception):
            raise
        except KeyboardInterrupt as err:
            from efficiency.runner import interrupted_case

            found = interrupted_case(err)
            # in this case's own phases (a technique's baseline measured already, or the baseline case itself)
            if found is not None and (technique == self.cfg.baseline or model in self._baselines):
                self._record(unmeasured_case(case_id, model, technique, "interrupted", _interrupted_reason(found),
                                             partial=found.sections, phases_done=found.phases_done))
            raise
        except Exception as err:
            from efficiency.runner import CaseOutOfMemory

            if isinstance(err, (CaseOutOfMemory, Unavailable)):
                self._not_measured(case_id, model, technique, err)
            self._record(unmeasured_case(case_id, model, technique, "error", f"{type(err).__name__}: {err}",
                                         traceback=traceback.format_exc()[-4000:]))
            raise
        return self._judge(result, base)

    def _judge(self, result: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        from efficiency.gate import check_perplexity

        technique = result["technique"]
        ppl = result["perplexity"]
        result["baseline"] = {
            "technique": base["technique"], "perplexity": base["perplexity"]["value"],
            "runtime_s": base["metrics"]["runtime_s"], "energy_j": base["metrics"]["energy_j"],
        }
        limit = self.cfg.thresholds.limit_for(technique)
        threshold: dict[str, Any] = {"limit_pct": limit, "checked": False, "passed": None, "violation": None}
        if ppl["value"] is None:  # non-finite: a broken technique is data, not a crash
            result["status"] = "invalid"
            result["reason"] = (f"perplexity is not finite ({', '.join(result.get('non_finite') or ['value'])}); "
                                "no score, and the case fails")
            threshold.update(checked=True, passed=False, reason=result["reason"])
            result["threshold"] = threshold
            self._record(result)
            pytest.fail(f"{result['id']}: {result['reason']}", pytrace=False)
        idle_w = ((self.report.get("environment") or {}).get("idle_power") or {}).get("power_w")
        energy = result.get("energy") or {}
        if idle_w is not None and energy.get("energy_j") is not None:
            from efficiency.phases.perplexity import net_of_idle

            energy.update(net_of_idle(energy, idle_w))
        result["deltas"] = case_deltas(result, base)
        result["scores"] = case_scores(result["deltas"])
        if result["is_baseline"]:
            threshold["reason"] = "baseline case"
        elif not ppl["meaningful"]:
            threshold["reason"] = ppl["reason"]
        elif base["perplexity"]["value"] is None:
            threshold["reason"] = "the baseline's perplexity is not finite"
        else:
            violation = check_perplexity(result["id"], technique, ppl["value"], base["perplexity"]["value"],
                                         self.cfg.baseline, limit)
            threshold.update(checked=True, passed=violation is None,
                             violation=violation.to_dict() if violation else None)
        accuracy = self._accuracy_violations(result, base)
        threshold["accuracy_violations"] = accuracy
        if accuracy:
            threshold["passed"] = False
        result["threshold"] = threshold
        self._record(result)
        messages = ([threshold["violation"]["message"]] if threshold["violation"] else []) + \
            [v["message"] for v in accuracy]
        if messages:
            pytest.fail("\n".join(messages), pytrace=False)
        return result

    def _accuracy_violations(self, result: dict[str, Any], base: dict[str, Any]) -> list[dict[str, Any]]:
        """Accuracy drops beyond ``--eff-accuracy-threshold TASK=POINTS`` against the baseline (lm-eval tasks)."""
        limits = self.cfg.tasks.thresholds
        case_tasks, base_tasks = result.get("tasks") or {}, base.get("tasks") or {}
        if not limits or result["is_baseline"] or not case_tasks.get("results") or not base_tasks.get("results"):
            return []
        from efficiency.measure.tasks import accuracy_violations

        found = accuracy_violations(result["id"], case_tasks["results"], base_tasks["results"], limits,
                                    self.cfg.tasks.metric)
        return [{"case_id": result["id"], "metric": f"{v.task}:{v.metric}", "value": v.value,
                 "limit": v.limit_points, **v.to_dict()} for v in found]


def _interrupted_reason(found: InterruptedCase) -> str:
    """Where a case was interrupted, and its main figures measured before (the tables show the reason)."""
    reason = f"the run was interrupted in the case's {found.phase} phase" + (
        f", after {', '.join(found.phases_done)}" if found.phases_done else ", its first")
    sections = found.sections
    figures = [f"perplexity {v:.6g}" for v in [(sections.get("perplexity") or {}).get("value")] if v is not None]
    figures += [f"timed pass {v:.4g} s" for v in [(sections.get("runtime") or {}).get("median_s")] if v is not None]
    return reason + (f"; measured before it: {', '.join(figures)} (all in 'partial')" if figures else "")


def _mark_pareto(cases: list[dict[str, Any]]) -> None:
    """Per model, flag cases not dominated beyond the noise tolerance of each Pareto axis of the registry
    (perplexity where meaningful, runtime, energy where measured for every case of the model)."""
    measured = [c for c in cases if c.get("status") == "measured"]
    for model in {c["model"] for c in measured}:
        group = [c for c in measured if c["model"] == model]
        flags, axes = pareto_flags(group)
        for c, flag in zip(group, flags, strict=True):
            c["pareto"] = {"on_front": flag, "axes": axes}
