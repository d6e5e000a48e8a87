"""lm-eval tasks on the loaded model, offline: the shipped local task through the phase, baseline deltas in
points, accuracy thresholds, and an unreachable task that says why."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO, SHARED_DATA, byte_context
from efficiency.config import ConfigError, Workload
from efficiency.measure.tasks import TaskUnavailable, accuracy_violations, load_tasks, parse_results, task_deltas
from efficiency.phases.base import PhaseContext, run_phase
from efficiency.phases.quality_settings import TasksSettings, parse_thresholds
from efficiency.phases.tasks import TasksPhase
from efficiency.techniques.base import parse

TASKS_DIR = REPO / "fixtures" / "tasks"
pytest.importorskip("lm_eval")


def gpt2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    path = SHARED_DATA / "architectures" / "gpt2"
    if not (path / "vocab.json").is_file():
        pytest.skip(f"GPT-2 tokenizer not found under {path} (set EFFICIENCY_DATA_DIR)")
    return AutoTokenizer.from_pretrained(str(path))


def tiny_gpt2(vocab: int) -> Any:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2,
                                                       n_head=4)).eval()


def phase_context(tokenizer: Any, store: dict[str, Any], is_baseline: bool, case_id: str) -> PhaseContext:
    from efficiency.measure.energy import NullMeter

    return PhaseContext(case_id=case_id, device="cpu", workload=Workload(min_rounds=1), tokens=None,
                        tokenizer=tokenizer, context=64, stride=64, meters={"cpu": NullMeter("test")},
                        primary="cpu", sync=lambda: None, store=store, model_name="tiny", is_baseline=is_baseline)


def test_shipped_task_through_the_phase_with_deltas_and_a_threshold(tmp_path: Path, one_thread: None) -> None:
    tok = gpt2_tokenizer()
    base = tiny_gpt2(len(tok))
    settings = TasksSettings(tasks=("eff_facts",), tasks_dir=TASKS_DIR, limit=12, batch_size=4)
    store: dict[str, Any] = {}
    sections = {}
    for technique in ("fp32", "mag50"):
        model = base if technique == "fp32" else parse("mag50").apply(copy.deepcopy(base), byte_context(tmp_path))
        ctx = phase_context(tok, store, technique == "fp32", f"tiny-{technique}")
        phase = TasksPhase(settings)
        record = run_phase(phase, model, ctx)
        assert record.window.wall_s > 0 and record.setup_s > 0
        sections[technique] = phase.section(record, ctx)["tasks"]
    b, c = sections["fp32"], sections["mag50"]
    r = b["results"]["eff_facts"]
    assert r["n_docs"] == 12
    assert 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1 and r["acc_stderr"] > 0  # lm-eval's names
    assert b["deltas_points"] == {"eff_facts": {"acc": 0.0, "acc_norm": 0.0}}
    d = c["deltas_points"]["eff_facts"]["acc"]
    assert d == pytest.approx(100 * (c["results"]["eff_facts"]["acc"] - r["acc"]))
    assert c["energy"]["energy_j"] is None and c["energy"]["reason"]  # no meter here: null with the reason
    assert b["mean_acc"] == r["acc"]
    # a limit below a measured drop fails; one above it passes
    case, ref = {"eff_facts": {"acc": 0.25}}, {"eff_facts": {"acc": 0.5}}
    [v] = accuracy_violations("tiny-mag50", case, ref, {"eff_facts": 10.0})
    assert v.drop_points == pytest.approx(25.0)
    assert "25.00 vs baseline 50.00" in v.message and "limit of 10 points" in v.message
    assert accuracy_violations("tiny-mag50", case, ref, {"eff_facts": 30.0}) == []


def test_unreachable_task_data_is_unavailable_with_the_reason(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "remote_only.yaml").write_text(
        "task: remote_only\ndataset_path: efficiency-tests-nonexistent/no-such-dataset\noutput_type: "
        "multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n"
        "metric_list:\n  - metric: acc\n")
    with pytest.raises(TaskUnavailable, match="remote_only is not local and could not be fetched"):
        load_tasks(["remote_only"], folder)


@pytest.mark.slow
def test_unknown_task_names_the_places_searched() -> None:
    """Slow: an unknown name is looked up in lm-eval's whole registry (~15k YAMLs indexed)."""
    with pytest.raises(TaskUnavailable, match="unknown lm-eval task.*no_such_task.*fixtures/tasks"):
        load_tasks(["no_such_task"], TASKS_DIR)


def test_results_parsing_and_deltas() -> None:
    out = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75,
                             "acc_norm_stderr,none": "N/A"}},
           "n-samples": {"t": {"original": 40, "effective": 10}}}
    [score] = parse_results(out).values()
    assert score.to_dict() == {"acc": 0.5, "acc_norm": 0.75, "acc_stderr": 0.1, "acc_norm_stderr": None,
                               "n_docs": 10}
    assert task_deltas({"t": score.to_dict()}, {"t": {"acc": 0.25}}) == {"t": {"acc": 25.0}}
    assert task_deltas({"t": {"acc": 0.5}}, {}) == {}


def test_settings_validation() -> None:
    assert parse_thresholds(["eff_facts=5", "arc_easy = 2.5"]) == {"eff_facts": 5.0, "arc_easy": 2.5}
    with pytest.raises(ConfigError, match="TASK=POINTS"):
        parse_thresholds(["eff_facts"])
    with pytest.raises(ConfigError, match="not a number"):
        parse_thresholds(["eff_facts=lots"])
    with pytest.raises(ConfigError, match="not run: arc"):
        TasksSettings(tasks=("eff_facts",), thresholds={"arc": 1.0})
    with pytest.raises(ConfigError, match="limit"):
        TasksSettings(tasks=("eff_facts",), limit=0)
    assert not TasksSettings().enabled and TasksSettings(tasks=("eff_facts",)).enabled
