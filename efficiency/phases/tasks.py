"""The ``tasks`` phase: lm-evaluation-harness tasks on the case's loaded (and transformed) model, in its own
measured window (time and energy of the tasks, apart from the perplexity pass). Loading the task documents
and wrapping the model are untimed setup."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, ClassVar

from efficiency.phases.base import PhaseContext, PhaseRecord
from efficiency.phases.perplexity import RANDOM_PPL_REASON, energy_per_unit
from efficiency.phases.quality_settings import TasksSettings

STORE_KEY = "tasks"  # the baseline's task results, per model


@dataclass
class TasksPhase:
    settings: TasksSettings
    random_weights: bool = False
    name: ClassVar[str] = "tasks"
    _lm: Any = field(default=None, repr=False)
    _task_dict: Any = field(default=None, repr=False)

    def setup(self, model: Any, ctx: PhaseContext) -> None:
        from efficiency.measure.tasks import load_tasks, wrap_model

        s = self.settings
        ctx.log(f"{ctx.case_id}: lm-eval tasks {', '.join(s.tasks)}"
                + (f" (limit {s.limit} documents each)" if s.limit else ""))
        self._task_dict = load_tasks(s.tasks, s.tasks_dir)
        self._lm = wrap_model(model, ctx.tokenizer, s.batch_size)

    def run(self, model: Any, ctx: PhaseContext) -> Any:
        from efficiency.measure.tasks import evaluate_tasks

        try:
            return evaluate_tasks(self._lm, self._task_dict, self.settings.limit)
        finally:
            self._lm = self._task_dict = None  # the wrapper holds the model: let it go with the case

    def section(self, record: PhaseRecord, ctx: PhaseContext) -> dict[str, Any]:
        from efficiency.measure.tasks import task_deltas

        results = {task: score.to_dict() for task, score in record.result.items()}
        if ctx.is_baseline:
            ctx.store[STORE_KEY] = results
        base = ctx.store.get(STORE_KEY)
        deltas = task_deltas(results, base) if base is not None else None
        accs = [r[self.settings.metric] for r in results.values() if isinstance(r.get(self.settings.metric), float)]
        return {"tasks": {
            "results": results,
            "deltas_points": deltas,
            "deltas_reason": None if deltas is not None else "the baseline's task results are not in this session",
            "mean_" + self.settings.metric: statistics.fmean(accs) if accs else None,
            "meaningful": not self.random_weights,
            "reason": RANDOM_PPL_REASON.replace("perplexity", "accuracy") if self.random_weights else None,
            "limit": self.settings.limit,
            "wall_s": record.window.wall_s,
            "setup_s": record.setup_s,
            "energy": energy_per_unit(record.window, 1, ctx.primary),
            "method": "lm-evaluation-harness (library) on the loaded model via HFLM; zero-shot; one window for "
                      "all tasks",
        }}
