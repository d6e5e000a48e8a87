"""Session outcomes that a release gate depends on: non-finite numbers, out-of-memory, unwritable reports,
runs stopped early. Tiny local GPT-2, CPU."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path
from typing import Any

import pytest

from conftest import save_tiny_gpt2


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("session")
    save_tiny_gpt2(root / "m" / "t", n_positions=64, n_embd=32)
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return root


def session(root: Path, **opts: Any) -> Any:
    from efficiency.session import EfficiencySession
    from efficiency.settings import build_config

    base = {"models": "t", "techniques": "fp32,bnb4", "model_dir": str(root / "m"), "dataset": str(root / "text.txt"),
            "device": "cpu", "max_tokens": "200", "context": 32, "stride": 32, "rounds": 2, "decode_tokens": 3,
            "prefill_tokens": 8, "cache_dir": str(root / "cache"), "reports_dir": str(root / "reports")}
    cfg = build_config({**base, **opts}, {}, root)
    return EfficiencySession(cfg, root, quiet=True)


def test_a_nan_perplexity_makes_the_case_invalid_and_keeps_the_report_valid(tiny_root: Path, monkeypatch: Any,
                                                                             one_thread: None) -> None:
    from efficiency.measure import perplexity

    s = session(tiny_root)
    s.run_case("t", "fp32")
    real_run = perplexity.PerplexityEvaluator.run

    def broken(self: Any, model: Any, device: Any, progress: Any = None) -> Any:
        from dataclasses import replace

        return replace(real_run(self, model, device, progress), perplexity=float("nan"))

    monkeypatch.setattr(perplexity.PerplexityEvaluator, "run", broken)
    with pytest.raises(pytest.fail.Exception, match="perplexity is not finite"):
        s.run_case("t", "bnb4")
    case = s.report["cases"][-1]
    assert case["status"] == "invalid" and case["perplexity"]["value"] is None and "scores" not in case
    s.finish(1)
    text = s.written[0].read_text()
    json.loads(text)  # strict JSON: no NaN
    assert "NaN" not in text and s.report["status"] == "complete"


def test_out_of_memory_is_a_status_and_the_model_is_freed(tiny_root: Path, monkeypatch: Any,
                                                          one_thread: None) -> None:
    import torch

    from efficiency import runner as runner_mod
    from efficiency.phases import perplexity as ppl_phase

    s = session(tiny_root)
    s.run_case("t", "fp32")
    refs: list[Any] = []
    real_load = runner_mod.load

    def tracking_load(*args: Any, **kwargs: Any) -> Any:
        loaded = real_load(*args, **kwargs)
        refs.append(weakref.ref(loaded.model))
        return loaded

    def out_of_memory(self: Any, model: Any, ctx: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runner_mod, "load", tracking_load)
    monkeypatch.setattr(ppl_phase.QualityPhase, "run", out_of_memory)
    with pytest.raises(pytest.fail.Exception, match="out of memory"):
        s.run_case("t", "bnb4")
    case = s.report["cases"][-1]
    assert case["status"] == "oom" and "Tried to allocate" in case["reason"]
    gc.collect()
    assert refs and refs[0]() is None, "the model that ran out of memory is still referenced"


def test_an_unwritable_report_target_keeps_the_measurements(tiny_root: Path, tmp_path: Path,
                                                            one_thread: None) -> None:
    target = tmp_path / "out.json"
    s = session(tiny_root, techniques="fp32", report=str(target))
    target.mkdir()  # becomes unwritable as a file after the start-up check
    s.run_case("t", "fp32")
    assert s.write_errors and str(target) in s.write_errors[0]
    assert s.fallback_path is not None and json.loads(s.fallback_path.read_text())["cases"][0]["id"] == "t-fp32"
    assert any(p.parent == tiny_root / "reports" for p in s.written)


def test_a_run_stopped_early_is_incomplete_never_complete(tiny_root: Path, one_thread: None) -> None:
    s = session(tiny_root)
    s.expect(["t-fp32", "t-bnb4"])
    s.run_case("t", "fp32")
    s.finish(1, stopped_early=True)
    assert s.report["status"] == "incomplete"
    s2 = session(tiny_root)
    s2.expect(["t-fp32", "t-bnb4"])
    s2.run_case("t", "fp32")
    s2.finish(0)
    assert s2.report["status"] == "incomplete"  # a collected case never ran



def test_xdist_controller_keeps_a_streamed_case_once_and_a_crashed_case_is_not_complete(tiny_root: Path) -> None:
    # A worker sends each case as it ends and all of them again when it finishes; a case whose worker died is an
    # error that never ended (the run is not complete) until a replacement worker measures it.
    s = session(tiny_root)
    s.expect(["t-fp32", "t-bnb4"])
    s._ensure_report(idle_power={"power_w": None, "reason": "controller"})
    fp32 = {"id": "t-fp32", "model": "t", "technique": "fp32", "status": "measured"}
    s.merge_worker_cases(json.dumps([fp32]))
    s.record_crash("t-bnb4", "t", "bnb4", "worker 'gw1' crashed while running 'g.py::t[t-bnb4]'")
    s.record_crash("t-fp32", "t", "fp32", "worker 'gw1' crashed while running 'g.py::t[t-fp32]'")  # it had ended
    s.merge_worker_cases(json.dumps([fp32]))  # the finished worker's workeroutput
    assert [(c["id"], c["status"]) for c in s.report["cases"]] == [("t-fp32", "measured"), ("t-bnb4", "error")]
    assert "crashed while running" in s.report["cases"][1]["reason"]
    assert s.run_status(1) == "incomplete" and s.missing() == ["t-bnb4"]
    s.merge_worker_cases(json.dumps([{"id": "t-bnb4", "model": "t", "technique": "bnb4", "status": "measured"}]))
    assert s.report["cases"][1]["status"] == "measured" and "gw1" in s.report["cases"][1]["after_worker_crash"]
    assert s.run_status(1) == "complete" and json.loads((tiny_root / "reports").glob("*.json").__next__().read_text())


def test_a_failed_phase_group_says_where_its_error_was_raised(tiny_root: Path, monkeypatch: Any,
                                                              one_thread: None) -> None:
    """The opt-6.7b grid on the H200 reported fp8dq's and fp8wo's latency as 'prefill: AssertionError: ', a bare
    assert deep in a library, which said nothing about what failed. The reason now names the innermost frame, the
    log carries the traceback, and the rest of the case is measured."""
    from efficiency.phases import latency

    def bare_assert(self: Any, model: Any, ctx: Any) -> None:
        raise AssertionError  # what a bare assert raises outside pytest's rewritten test modules

    monkeypatch.setattr(latency.PrefillPhase, "setup", bare_assert)
    s = session(tiny_root, techniques="fp32")
    lines: list[str] = []
    s.runner.log = lines.append
    s.run_case("t", "fp32")
    case = s.report["cases"][-1]
    assert case["status"] == "measured" and case["perplexity"]["value"] is not None
    reason = case["latency"]["reason"]
    assert reason.startswith("prefill: AssertionError: (no message) (raised at ")
    assert "test_session.py:" in reason and "in bare_assert" in reason
    assert case["latency"]["decode_s_per_token"] is None
    assert any("latency not measured" in ln for ln in lines)
    assert any("raise AssertionError" in ln for ln in lines)  # the traceback is in the log
