"""Slow: the real SmolLM2-135M (fp32 against bnb4) on the shipped local task and on KL divergence over
WikiText-2: per-task accuracy with deltas in points, and a KL divergence that a trained model makes
meaningful (not the near-uniform distribution of random weights)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, byte_context, shared_cache_dir
from efficiency.config import Workload
from efficiency.phases.base import PhaseContext, run_phase
from efficiency.phases.kld import KldPhase
from efficiency.phases.quality_settings import KldSettings, TasksSettings
from efficiency.phases.tasks import TasksPhase

pytestmark = pytest.mark.slow


def phase_context(tokens: Any, tokenizer: Any, store: dict[str, Any], technique: str) -> PhaseContext:
    from efficiency.measure.energy import NullMeter

    return PhaseContext(case_id=f"smollm2-135m-{technique}", device="cpu", workload=Workload(min_rounds=1),
                        tokens=tokens, tokenizer=tokenizer, context=256, stride=256,
                        meters={"cpu": NullMeter("test")}, primary="cpu", sync=lambda: None, store=store,
                        model_name="smollm2-135m", is_baseline=technique == "fp32")


def test_smollm2_fp32_against_bnb4_tasks_and_kld(shared_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    import torch

    from efficiency.data import load_corpus
    from efficiency.models import load, resolve
    from efficiency.techniques.base import parse

    cache = shared_cache_dir()
    loaded = load(resolve("smollm2-135m", (), False, cache), "cpu", torch.float32, cache)
    text = load_corpus("wikitext2", shared_data).text[:20000]
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[0]
    tasks = TasksSettings(tasks=("eff_facts",), tasks_dir=REPO / "fixtures" / "tasks", batch_size=8)
    kld = KldSettings(tokens=1024)
    store: dict[str, Any] = {}
    out: dict[str, dict[str, Any]] = {}
    for technique in ("fp32", "bnb4"):
        model = loaded.model if technique == "fp32" else parse("bnb4").apply(copy.deepcopy(loaded.model),
                                                                           byte_context(tmp_path))
        ctx = phase_context(ids, loaded.tokenizer, store, technique)
        out[technique] = {}
        for phase in (KldPhase(kld), TasksPhase(tasks)):
            out[technique].update(phase.section(run_phase(phase, model, ctx), ctx))
    print(json.dumps({t: {"acc": o["tasks"]["results"]["eff_facts"], "deltas": o["tasks"]["deltas_points"],
                          "task_wall_s": o["tasks"]["wall_s"],
                          "kld": {k: o["kld"][k] for k in ("mean", "p99", "top1_match", "tail_mass_mean")}}
                      for t, o in out.items()}, indent=1))
    fp32, bnb4 = out["fp32"], out["bnb4"]
    acc = fp32["tasks"]["results"]["eff_facts"]
    assert acc["n_docs"] == 40 and acc["acc"] > 0.4  # a trained model beats chance (0.25) on everyday facts
    delta = bnb4["tasks"]["deltas_points"]["eff_facts"]["acc"]
    assert delta == pytest.approx(100 * (bnb4["tasks"]["results"]["eff_facts"]["acc"] - acc["acc"]))
    assert fp32["kld"]["mean"] < 1e-6 and fp32["kld"]["top1_match"] == 1.0
    assert 1e-3 < bnb4["kld"]["mean"] < 1.0 and 0.5 < bnb4["kld"]["top1_match"] < 1.0
    assert bnb4["kld"]["p99"] > bnb4["kld"]["mean"]
    assert fp32["kld"]["tail_mass_mean"] < 0.05  # the top 4,096 hold nearly all of a trained model's mass
