"""The issue-12 registry entries point at fields the KLD, tasks and serving phases write."""

from __future__ import annotations

from typing import Any

import torch

from conftest import tiny_model
from efficiency.config import Workload
from efficiency.measure.tasks import TaskScore
from efficiency.metrics import QUALITY_SERVING_METRICS
from efficiency.phases.base import PhaseContext, PhaseRecord, Window, run_phase
from efficiency.phases.kld import KldPhase
from efficiency.phases.quality_settings import KldSettings, ServingSettings, TasksSettings
from efficiency.phases.serving import ServingPhase
from efficiency.phases.tasks import TasksPhase


def test_registry_paths_exist_in_the_sections(one_thread: None) -> None:
    from efficiency.measure.energy import NullMeter

    ids = torch.randint(3, 128, (120,), generator=torch.Generator().manual_seed(0))
    ctx = PhaseContext("tiny-fp32", "cpu", Workload(min_rounds=1), ids, None, 32, 32,
                       {"cpu": NullMeter("test")}, "cpu", lambda: None, is_baseline=True)
    model = tiny_model("opt")
    sections: dict[str, Any] = {}
    serving = ServingSettings(batch_sizes=(1, 2), input_tokens=8, output_tokens=3)
    for phase in (KldPhase(KldSettings(tokens=64)), ServingPhase(1, serving), ServingPhase(2, serving, last=True)):
        sections.update(phase.section(run_phase(phase, model, ctx), ctx))
    tasks = TasksPhase(TasksSettings(tasks=("eff_facts",)))  # its section from a record of lm-eval's scores
    score = TaskScore("eff_facts", {"acc": 0.5}, {"acc": 0.1}, 10)
    record = PhaseRecord("tasks", {"eff_facts": score}, Window(1.0, {"cpu": None}, None))
    sections.update(tasks.section(record, ctx))
    case = {"status": "measured", "perplexity": {"meaningful": True}, **sections}
    for m in QUALITY_SERVING_METRICS:
        cur: Any = case
        for key in m.path:
            assert isinstance(cur, dict) and key in cur, f"{m.name}: {'.'.join(m.path)} missing"
            cur = cur[key]
    values = {m.name: m.value(case) for m in QUALITY_SERVING_METRICS}
    assert values["kld_mean"] == 0.0 and values["top1_match"] == 1.0 and values["task_acc_mean"] == 0.5
    assert values["serving_tokens_per_s"] and values["serving_tokens_per_s"] > 0
    assert values["serving_j_per_token"] is None  # no energy meter here: null, never 0
