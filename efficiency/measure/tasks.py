"""Accuracy on lm-evaluation-harness tasks, run as a library on a model already loaded (and transformed).

``load_tasks`` resolves task names through lm-eval's TaskManager (a local include folder first, so that local
task YAMLs with local data work offline) and loads their documents; ``evaluate_tasks`` runs them on a
``transformers`` model through lm-eval's HFLM wrapper and returns lm-eval's own metrics (acc, acc_norm, ...
each with its stderr) per task. ``task_deltas`` and ``accuracy_violations`` compare a case with its baseline in
points (percentage points: 100 x the difference of two fractions).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from efficiency.data import DataUnavailable


class TaskUnavailable(DataUnavailable):
    """A task cannot be run here (unknown name, or its data is neither local nor reachable); the message says
    which and why."""


@dataclass(frozen=True)
class TaskScore:
    """lm-eval's metrics for one task: ``metrics`` maps a metric name (``acc``) to its value and
    ``stderr`` the same name to its standard error (None where lm-eval gives none)."""

    task: str
    metrics: Mapping[str, float]
    stderr: Mapping[str, float | None]
    n_docs: int

    def to_dict(self) -> dict[str, Any]:
        return {**dict(self.metrics), **{f"{k}_stderr": v for k, v in self.stderr.items()}, "n_docs": self.n_docs}


def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def task_manager(names: Sequence[str], tasks_dir: Path | None) -> Any:
    """A TaskManager that knows ``names``: the local folder alone when it has them all (fast, offline), else
    the folder plus lm-eval's own task registry."""
    _quiet_lm_eval()
    if tasks_dir is not None:
        local = _manager(str(tasks_dir), include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    manager = _manager(str(tasks_dir) if tasks_dir else None, include_defaults=True)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        where = f" or in {tasks_dir}" if tasks_dir else " (give --eff-tasks-dir for local task YAMLs)"
        raise TaskUnavailable(f"unknown lm-eval task(s) {', '.join(unknown)}: not in lm-eval's registry{where}")
    return manager


@functools.lru_cache(maxsize=8)
def _manager(include_path: str | None, include_defaults: bool) -> Any:
    """Indexing lm-eval's own registry reads ~15k YAMLs (seconds): once per run, not once per case."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def load_tasks(names: Sequence[str], tasks_dir: Path | None) -> Any:
    """lm-eval's task dict for ``names`` with their documents loaded. Raises :class:`TaskUnavailable` when a
    task is unknown or its data can neither be read locally nor downloaded (offline, hub unreachable)."""
    manager = task_manager(names, tasks_dir)
    try:
        return manager.load(list(names))
    except Exception as err:  # datasets raises ConnectionError, OSError, FileNotFoundError, ValueError offline
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise TaskUnavailable(f"data of task(s) {', '.join(names)} is not local and could not be fetched"
                              f"{hint}: {type(err).__name__}: {str(err)[:300]}") from err


def wrap_model(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's HFLM around a loaded model (its device and dtype as they are)."""
    from lm_eval.models.huggingface import HFLM

    _quiet_lm_eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def evaluate_tasks(lm: Any, task_dict: Any, limit: int | None) -> dict[str, TaskScore]:
    """Run the loaded tasks; lm-eval's metrics per task (filter suffix ``,none`` dropped)."""
    from lm_eval.evaluator import evaluate

    out = evaluate(lm, task_dict, limit=limit, bootstrap_iters=1000, log_samples=False, verbosity="ERROR")
    if out is None:
        raise RuntimeError("lm-eval returned no results (not rank 0)")
    return parse_results(out)


def parse_results(out: Mapping[str, Any]) -> dict[str, TaskScore]:
    """``{"results": {task: {"acc,none": 0.5, "acc_stderr,none": 0.1, ...}}, "n-samples": ...}`` -> scores."""
    scores: dict[str, TaskScore] = {}
    n_samples = out.get("n-samples") or {}
    for task, raw in (out.get("results") or {}).items():
        metrics: dict[str, float] = {}
        stderr: dict[str, float | None] = {}
        for key, value in raw.items():
            name, _, filt = key.partition(",")
            if not filt or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if name.endswith("_stderr"):
                continue
            metrics[name] = float(value)
            err = raw.get(f"{name}_stderr,{filt}")
            stderr[name] = float(err) if isinstance(err, (int, float)) and not isinstance(err, bool) else None
        n = n_samples.get(task) or {}
        scores[task] = TaskScore(task, metrics, stderr, int(n.get("effective", n.get("original", 0)) or 0))
    return scores


def task_deltas(case: Mapping[str, Mapping[str, Any]], base: Mapping[str, Mapping[str, Any]]) -> \
        dict[str, dict[str, float]]:
    """Per task and metric, the case's value minus the baseline's in points (x100), for the metrics both
    have. Inputs are the ``tasks`` report sections: ``{task: {"acc": 0.5, "acc_stderr": ..., ...}}``."""
    out: dict[str, dict[str, float]] = {}
    for task, values in case.items():
        ref = base.get(task)
        if not isinstance(values, Mapping) or not isinstance(ref, Mapping):
            continue
        d = {m: 100.0 * (float(v) - float(ref[m])) for m, v in values.items()
             if m != "n_docs" and not m.endswith("_stderr") and isinstance(v, (int, float))
             and isinstance(ref.get(m), (int, float))}
        if d:
            out[task] = d
    return out


@dataclass(frozen=True)
class AccuracyViolation:
    task: str
    metric: str
    value: float
    baseline_value: float
    drop_points: float
    limit_points: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def accuracy_violations(case_id: str, case: Mapping[str, Mapping[str, Any]],
                        base: Mapping[str, Mapping[str, Any]], limits: Mapping[str, float],
                        metric: str = "acc") -> list[AccuracyViolation]:
    """The tasks whose ``metric`` dropped by more than their limit (points) against the baseline."""
    out: list[AccuracyViolation] = []
    for task, limit in limits.items():
        value = (case.get(task) or {}).get(metric)
        ref = (base.get(task) or {}).get(metric)
        if not isinstance(value, (int, float)) or not isinstance(ref, (int, float)):
            continue
        drop = 100.0 * (float(ref) - float(value))
        if drop > limit:
            msg = (f"{case_id}: {task} {metric} {100 * value:.2f} vs baseline {100 * ref:.2f}: a drop of "
                   f"{drop:.2f} points, above the limit of {limit:g} points")
            out.append(AccuracyViolation(task, metric, float(value), float(ref), drop, float(limit), msg))
    return out
