"""The plugin end to end through pytester, on a tiny random GPT-2 saved as a local HF folder (fast on CPU)."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, SHARED_DATA, save_tiny_gpt2
from efficiency.config import ConfigError
from efficiency.plugin import grid
from efficiency.settings import build_config, canonical_config

GRID_TEST = """
def test_efficiency(eff_case, eff_session, benchmark):
    eff_session.run_case(eff_case.model, eff_case.technique, benchmark)
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models/tiny-gpt2``: a 2-layer GPT-2 with the real GPT-2 tokenizer, and a small text corpus."""
    root = tmp_path_factory.mktemp("eff")
    save_tiny_gpt2(root / "models" / "tiny-gpt2")
    text = (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:6000]
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    return root


def run_grid(pytester: pytest.Pytester, tiny_dir: Path, *args: str,
             benchmark: bool = False) -> tuple[pytest.RunResult, dict[str, Any]]:
    pytester.makepyfile(test_grid=GRID_TEST)
    result = pytester.runpytest_subprocess(
        "--rootdir", str(pytester.path), "-p", "no:cacheprovider", *([] if benchmark else ["--benchmark-disable"]),
        "--eff-quiet",
        "--eff-models", "tiny-gpt2", "--eff-model-dir", str(tiny_dir / "models"),
        "--eff-dataset", str(tiny_dir / "corpus.txt"), "--eff-max-tokens", "300", "--eff-context", "64",
        "--eff-stride", "32", "--eff-rounds", "2", "--eff-decode-tokens", "3", "--eff-prefill-tokens", "16",
        "--eff-cache-dir", str(tiny_dir / "cache"), "--eff-report", "run.json", *args,
    )
    report_path = pytester.path / "run.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return result, report


def test_grid_ids_report_and_summary_table(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    result, report = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32,bnb8,bnb4", "-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([
        "*test_efficiency?tiny-gpt2-fp32? PASSED*", "*test_efficiency?tiny-gpt2-bnb4? PASSED*",
        "*pytest-efficiency*", "case*ppl*energy J*", "tiny-gpt2-bnb4*",
    ])
    assert report["status"] == "complete" and report["schema_version"] == 2
    cases = {c["technique"]: c for c in report["cases"]}
    assert set(cases) == {"fp32", "bnb8", "bnb4"}
    base, q4 = cases["fp32"], cases["bnb4"]
    assert base["is_baseline"] and not q4["is_baseline"]
    for c in cases.values():
        assert c["perplexity"]["value"] > 1 and c["runtime"]["median_s"] > 0 and c["size"]["size_bytes"] > 0
        assert c["energy"]["energy_j"] is None and c["energy"]["reason"]  # no RAPL/GPU here: null + reason
    assert q4["size"]["size_bytes"] < base["size"]["size_bytes"]
    assert q4["size"]["parameters"] == base["size"]["parameters"]
    assert q4["deltas"]["perplexity"] == pytest.approx(
        (q4["perplexity"]["value"] / base["perplexity"]["value"] - 1) * 100)
    assert q4["scores"]["balanced"]["status"] == "unavailable"
    assert report["environment"]["packages"]["torch"]
    # the quantisation libraries' versions decide kernels too (torchao 0.18 changed int8wo's CPU matmul)
    assert report["environment"]["packages"]["torchao"] == importlib.metadata.version("torchao")
    assert report["settings"]["thresholds"]["compile"] == 1.0  # the built-in step limit, recorded with the rest
    assert (pytester.path / "reports").is_dir() and list((pytester.path / "reports").glob("0001_*.json"))


def test_threshold_breach_fails_the_case_and_the_run(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    _, first = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32,bnb4", "--eff-threshold", "bnb4=1000")
    increase = next(c for c in first["cases"] if c["technique"] == "bnb4")["deltas"]["perplexity"]
    assert increase > 0, "this seed's bnb4 must raise perplexity for the test to mean anything"
    result, report = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32,bnb4",
                              "--eff-threshold", f"bnb4={increase / 2:.6f}")
    result.assert_outcomes(passed=1, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*tiny-gpt2-bnb4: perplexity * vs * for the fp32 baseline is +*above the bnb4 limit*"])
    assert [v["case_id"] for v in report["violations"]] == ["tiny-gpt2-bnb4"]
    assert report["status"] == "complete"


def test_random_weights_flag_perplexity_and_skip_the_gate(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    result, report = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32,bnb4", "--eff-random-weights",
                              "--eff-threshold", "0")
    result.assert_outcomes(passed=2)
    for c in report["cases"]:
        assert c["random_weights"] and not c["perplexity"]["meaningful"] and "meaningless" in c["perplexity"]["reason"]
        assert c["threshold"]["checked"] is False


def test_unknown_technique_is_a_usage_error(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    result, _ = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32,bnb3")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown technique 'bnb3'*known:*bnb4*"])
    # a pipeline whose steps are known but out of order is refused the same way, before any model loads
    result, report = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32,compile+bf16")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and not report
    result.stderr.fnmatch_lines(["*'compile' must be the last step of a pipeline*'compile+bf16'*"])


def test_unavailable_model_is_skipped_with_what_to_provide(pytester: pytest.Pytester, tiny_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(pytester.path / "empty-hf-home"))
    pytester.makepyfile(test_grid=GRID_TEST)
    args = ["-p", "no:cacheprovider", "--benchmark-disable", "--eff-quiet", "--eff-models", "opt-125m",
            "--eff-techniques", "fp32", "--eff-dataset", str(tiny_dir / "corpus.txt"), "-rs"]
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*opt-125m*not available offline*--eff-model-dir*--eff-random-weights*"])
    strict = pytester.runpytest_subprocess(*args, "--eff-strict")
    strict.assert_outcomes(failed=1)


def test_cuda_without_cuda_is_a_usage_error(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    result, _ = run_grid(pytester, tiny_dir, "--eff-techniques", "fp16", "--eff-device", "cuda")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--eff-device cuda requested but CUDA is not available*"])


def test_unsupported_technique_is_a_skip_with_the_reason(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    # A machine without a usable bitsandbytes: the bnb cases skip with the reason, the rest run.
    pytester.makeconftest("import sys\nsys.modules['bitsandbytes'] = None\n")
    result, report = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32,bnb4", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*tiny-gpt2-bnb4: TechniqueUnavailable: bitsandbytes is not usable here*"])
    assert [c["status"] for c in report["cases"]] == ["measured", "skipped"]


def test_ctrl_c_leaves_a_readable_report_marked_interrupted(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    pytester.makeconftest("""
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    if item.callspec.id.endswith("bnb4"):
        raise KeyboardInterrupt
""")
    result, report = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32,bnb8,bnb4")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert report["status"] == "interrupted" and report["finished_at"]
    assert [c["technique"] for c in report["cases"]] == ["fp32", "bnb8"]


def test_xdist_workers_cases_end_up_in_one_report(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    import shutil

    models = tiny_dir / "models"
    if not (models / "tiny-gpt2-b").exists():
        shutil.copytree(models / "tiny-gpt2", models / "tiny-gpt2-b")
    result, report = run_grid(pytester, tiny_dir, "--eff-models", "tiny-gpt2,tiny-gpt2-b", "--eff-techniques",
                              "fp32,bnb8", "-n", "2", "--dist", "loadgroup")
    result.assert_outcomes(passed=4)
    assert report["status"] == "complete"
    assert [c["id"] for c in report["cases"]] == ["tiny-gpt2-fp32", "tiny-gpt2-bnb8", "tiny-gpt2-b-fp32",
                                                  "tiny-gpt2-b-bnb8"]
    assert all(c["deltas"] for c in report["cases"])
    assert len(list((pytester.path / "reports").glob("*.json"))) == 1
    result.stdout.fnmatch_lines(["*pytest-efficiency*", "tiny-gpt2-b-bnb8 *"])


def _second_model(tiny_dir: Path) -> None:
    import shutil

    models = tiny_dir / "models"
    if not (models / "tiny-gpt2-b").exists():
        shutil.copytree(models / "tiny-gpt2", models / "tiny-gpt2-b")


def test_xdist_sigterm_leaves_an_interrupted_report_with_the_cases_workers_ended(pytester: pytest.Pytester,
                                                                                 tiny_dir: Path) -> None:
    # CI's cancel: TERM to the controller and its workers while a worker measures its second case. The case the
    # worker ended before must reach the controller's report at once (the worker never finishes to hand it over).
    _second_model(tiny_dir)
    pytester.makeconftest("""
import os, signal, time
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    if item.callspec.id == "tiny-gpt2-bnb8":
        report = item.config.rootpath / "run.json"
        deadline = time.time() + 30
        while time.time() < deadline and "tiny-gpt2-fp32" not in (report.read_text() if report.exists() else ""):
            time.sleep(0.2)
        os.kill(os.getppid(), signal.SIGTERM)  # the controller started this worker
        os.kill(os.getpid(), signal.SIGTERM)
""")
    result, report = run_grid(pytester, tiny_dir, "--eff-models", "tiny-gpt2,tiny-gpt2-b", "--eff-techniques",
                              "fp32,bnb8", "-n", "2", "--dist", "loadgroup")
    assert result.ret == pytest.ExitCode.INTERRUPTED, result.stdout.str()[-2000:]
    assert report["status"] == "interrupted" and report["finished_at"]
    status = {c["id"]: c["status"] for c in report["cases"]}
    assert status["tiny-gpt2-fp32"] == "measured" and "tiny-gpt2-bnb8" not in status
    assert "tiny-gpt2-bnb8" in report["missing"]
    assert (pytester.path / "reports" / "history.sqlite").exists()


def _kill_worker_in(pytester: pytest.Pytester, case_id: str) -> None:
    """A conftest whose worker process dies (SIGKILL, as the OOM killer sends) when it starts running ``case_id``."""
    pytester.makeconftest(f"""
import os, signal
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    if item.callspec.id == {case_id!r}:
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_xdist_worker_killed_mid_case_makes_the_run_incomplete_and_names_the_case(pytester: pytest.Pytester,
                                                                                   tiny_dir: Path) -> None:
    # The OOM killer's SIGKILL: pytest-xdist reports the case failed and, under --dist load, never reruns it.
    _second_model(tiny_dir)
    _kill_worker_in(pytester, "tiny-gpt2-b-bnb8")
    result, report = run_grid(pytester, tiny_dir, "--eff-models", "tiny-gpt2,tiny-gpt2-b", "--eff-techniques",
                              "fp32,bnb8", "-n", "2", "--dist", "load")
    result.assert_outcomes(passed=3, failed=1)
    assert report["status"] == "incomplete" and report["missing"] == ["tiny-gpt2-b-bnb8"]
    status = {c["id"]: c["status"] for c in report["cases"]}
    assert status == {"tiny-gpt2-fp32": "measured", "tiny-gpt2-bnb8": "measured", "tiny-gpt2-b-fp32": "measured",
                      "tiny-gpt2-b-bnb8": "error"}
    crashed = report["cases"][-1]
    assert "crashed while running" in crashed["reason"] and "not measured" in crashed["reason"]


def test_xdist_controller_expects_the_canonical_ids_its_workers_collect(pytester: pytest.Pytester,
                                                                         tiny_dir: Path) -> None:
    """Workers collect ``bnb4-nf4`` as ``tiny-gpt2-bnb4``; a controller that matched node ids against the names as
    given expected no case, so a run that lost one to a killed worker was still ``complete``."""
    _kill_worker_in(pytester, "tiny-gpt2-bnb4")
    result, report = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32,bnb4-nf4", "-n", "2", "--dist", "load")
    result.assert_outcomes(passed=1, failed=1)
    assert report["status"] == "incomplete" and report["missing"] == ["tiny-gpt2-bnb4"]
    assert [c["id"] for c in report["cases"]] == ["tiny-gpt2-fp32", "tiny-gpt2-bnb4"]


# --- a light plugin, inputs and outputs refused up front, exit codes (issues 8, 9, 10) -------------------------

def test_a_run_without_efficiency_cases_does_not_import_torch(pytester: pytest.Pytester) -> None:
    # In the spirit of torchao's lean-import test: the plugin is loaded (pytest11 entry point) but idle.
    pytester.makeconftest("""
import sys

def pytest_sessionfinish(session):
    open("modules.txt", "w").write("torch" if "torch" in sys.modules else "no torch")
""")
    pytester.makepyfile(test_plain="def test_ok():\n    assert 1 + 1 == 2\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")  # the plugin loads by its entry point
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["plugins:*efficiency*"])
    assert result.ret == pytest.ExitCode.OK
    assert (pytester.path / "modules.txt").read_text() == "no torch"


def test_unknown_model_is_refused_before_any_model_loads(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    result, report = run_grid(pytester, tiny_dir, "--eff-models", "tiny-gpt2,gtp2", "--eff-techniques", "fp32")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown model 'gtp2': not in the registry (*gpt2*opt-125m*smollm2-135m*"
                                 "Provide an HF-format folder*--eff-model-dir*"])
    assert not report and not (pytester.path / "reports").exists()


@pytest.mark.parametrize(("content", "message"), [
    (b"", "*dataset file *bad.txt is empty*"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 50, "*dataset file *bad.txt is not UTF-8 text*"),
    (b"too short", "*dataset file *bad.txt is too short: 9 bytes cannot hold the 64 tokens of one window*"),
])
def test_bad_dataset_is_refused_with_the_file_named(pytester: pytest.Pytester, tiny_dir: Path, content: bytes,
                                                    message: str) -> None:
    (pytester.path / "bad.txt").write_bytes(content)
    result, _ = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32", "--eff-dataset", "bad.txt")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_unwritable_outputs_are_refused_before_any_model_loads(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    (pytester.path / "blocked").write_text("a file where the reports folder should be")
    result, _ = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32", "--eff-reports-dir", "blocked/reports")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*reports folder *blocked/reports is not writable*nothing was measured*"])
    result, _ = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32", "--eff-history", "blocked/h.sqlite")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*history *blocked/h.sqlite is not writable*"])


@pytest.mark.parametrize("form", ["apart", "joined"])
def test_the_project_settings_apply_when_an_option_names_a_path_outside_the_project(
        pytester: pytest.Pytester, tiny_dir: Path, form: str) -> None:
    """pytest finds its rootdir before it loads plugins, so in ``--eff-dataset /elsewhere/corpus.txt`` the value read
    as a path to test and moved the rootdir to the common folder of it and the project: the project's
    [tool.efficiency] (its grid, its thresholds) was silently ignored and the built-in grid collected (failed before:
    smollm2-135m's four cases). README's CI command, with --eff-history outside the project, did it from its second
    run on."""
    pytester.makefile(".toml", pyproject='[tool.efficiency]\nmodels = ["tiny-gpt2"]\ntechniques = ["fp32", "bnb8"]\n')
    pytester.makepyfile(test_grid=GRID_TEST)
    corpus = str(tiny_dir / "corpus.txt")  # outside the project folder
    paths = {"--eff-dataset": corpus, "--eff-model-dir": str(tiny_dir / "models")}
    given = [a for k, v in paths.items() for a in ((k, v) if form == "apart" else (f"{k}={v}",))]
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--co", "-q", *given, "--eff-context", "64",
                                           "--eff-prefill-tokens", "16", "--eff-decode-tokens", "3")
    result.stdout.fnmatch_lines(["*test_efficiency?tiny-gpt2-fp32?", "*test_efficiency?tiny-gpt2-bnb8?"])
    result.stdout.no_fnmatch_line("*smollm2*")
    warned = "*pytest chose the rootdir * from the value of an option given apart*"
    if form == "apart":
        result.stdout.fnmatch_lines([f"{warned}are those of {pytester.path}.*"])
    else:  # pytest agrees: nothing to say
        result.stdout.no_fnmatch_line(warned)


@pytest.mark.parametrize(("pyproject", "message"), [
    ("[tool.efficiency]\nmax_tokens = 256\n",
     "*unknown key 'max_tokens' in ?tool.efficiency? (now spelled max-tokens)*"),
    ("[tool.efficiency.thresholds]\nbnb44 = 5\n", "*unknown technique 'bnb44'*"),
    ("[tool.efficiency]\nmin-window = nan\n", "*min-window must be a finite number*"),
    # before: INTERNALERROR (exit 3), and a quoted "false" switched random weights, and with them the gate, off
    ("[tool.efficiency]\ntasks = 5\n", "*?tool.efficiency? tasks must be a list of names*got 5*"),
    ('[tool.efficiency]\nrandom-weights = "false"\n', "*?tool.efficiency? random-weights must be true or false*"),
    # before: accepted without a word while sparsegpt50 was not in the run's grid, refused once it was
    ('[tool.efficiency.technique."sparsegpt50"]\nn_sequence = 4\n',
     "*technique 'sparsegpt50': unknown option(s) n_sequence; valid: *n_sequences*"),
])
def test_config_errors_are_usage_errors(pytester: pytest.Pytester, tiny_dir: Path, pyproject: str,
                                        message: str) -> None:
    pytester.makefile(".toml", pyproject=pyproject)
    result, _ = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_technique_names_are_made_canonical_once(tmp_path: Path) -> None:
    """Aliases and spaces became case ids the session did not expect (the run was 'incomplete') and thresholds
    that matched no case (bnb4-nf4=0 left bnb4 at the default 25%)."""
    opts = {"device": "cpu", "baseline": " fp32", "techniques": "fp32,bnb4-nf4,bnb4, fp32 + bnb4",
            "threshold": ["bnb4-nf4=0", "fp32 + bnb4=3"]}
    cfg = canonical_config(build_config(opts, {}, tmp_path), opts["threshold"])
    assert cfg.baseline == "fp32" and cfg.techniques == ("fp32", "bnb4", "fp32+bnb4")
    assert [c.id for c in grid(cfg)] == ["smollm2-135m-fp32", "smollm2-135m-bnb4", "smollm2-135m-fp32+bnb4"]
    assert cfg.thresholds.limit_for("bnb4") == 0 and cfg.thresholds.limit_for("fp32+bnb4") == 3
    # of two spellings of one technique the one of higher precedence wins: the command line over the table
    for table_name, cli_name in (("bnb4", "bnb4-nf4"), ("bnb4-nf4", "bnb4")):
        opts = {"device": "cpu", "techniques": "fp32,bnb4", "threshold": [f"{cli_name}=0"]}
        cfg = canonical_config(build_config(opts, {"thresholds": {table_name: 30}}, tmp_path), opts["threshold"])
        assert cfg.thresholds.limit_for("bnb4") == 0


def test_threshold_for_a_technique_outside_the_grid_is_an_error(tmp_path: Path) -> None:
    opts = {"device": "cpu", "techniques": "fp32,bnb4", "threshold": ["bnb44=5"]}
    # the grid once: before, the baseline was listed twice (fp32, fp32, bnb4)
    with pytest.raises(ConfigError, match=r"--eff-threshold for 'bnb44': not a technique of this run's grid "
                                          r"\(fp32, bnb4\) nor a step of one"):
        canonical_config(build_config(opts, {}, tmp_path), opts["threshold"])
    # a step of a pipeline in the grid is fine, in any spelling
    opts = {"device": "cpu", "techniques": "fp32,ah90+bnb4-nf4", "threshold": ["ah90=5", "bnb4-nf4=2"]}
    cfg = canonical_config(build_config(opts, {}, tmp_path), opts["threshold"])
    assert cfg.thresholds.limit_for("ah90") == 5 and cfg.thresholds.limit_for("ah90+bnb4") == 7


def test_aliases_give_the_ids_limits_and_report_of_canonical_names(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    result, report = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32,bnb4-nf4,bnb4, fp32 + bnb4", "-v",
                              "--eff-threshold", "bnb4-nf4=0", "--eff-threshold", "fp32 + bnb4=1000")
    result.stdout.fnmatch_lines(["*test_efficiency?tiny-gpt2-fp32? PASSED*", "*test_efficiency?tiny-gpt2-bnb4? *",
                                 "*test_efficiency?tiny-gpt2-fp32+bnb4? PASSED*"])
    assert report["status"] == "complete"  # before: 'incomplete', the expected ids were never measured
    assert report["settings"]["techniques"] == ["fp32", "bnb4", "fp32+bnb4"]
    limits = {c["id"]: c["threshold"]["limit_pct"] for c in report["cases"]}
    assert limits == {"tiny-gpt2-fp32": 25.0, "tiny-gpt2-bnb4": 0.0, "tiny-gpt2-fp32+bnb4": 1000.0}


@pytest.mark.parametrize(("args", "message"), [
    (["--eff-fail-on-regression", "nan"], "*--eff-fail-on-regression takes a finite percentage >= 0*got nan*"),
    (["--eff-fail-on-regression", "-5"], "*--eff-fail-on-regression takes a finite percentage >= 0*got -5*"),
    (["--eff-fail-on-regression", "5", "--eff-history", "off"],
     "*--eff-fail-on-regression*'last' is looked up in the history, but --eff-history is off: drop --eff-history off, "
     "or compare with a report file*"),
    (["--eff-compare", "last", "--eff-history", "off"],
     "*--eff-compare last: 'last' is looked up in the history, but --eff-history is off*"),
    (["--eff-compare", "missing/base.json"], "*--eff-compare missing/base.json: report missing/base.json does not "
                                             "exist; give an existing report file, 'last' or a commit*"),
    (["--eff-compare", ""], "*--eff-compare takes a report file, 'last' or a commit of the history, got '': give "
                            "one, or leave the option out*"),
    (["--eff-compare", " last ", "--eff-history", " off"],
     "*--eff-compare last: 'last' is looked up in the history, but --eff-history is off*"),
    (["--eff-shard", " "], "*argument --eff-shard: a value of spaces only: give a value, or leave the option out*"),
    (["--eff-report", "a-folder"],
     "*--eff-report */a-folder is not writable (it is a folder: give the path of a file)*"),
    (["--eff-compute-dtype", "int3"], "*--eff-compute-dtype compute-dtype must be one of fp32, fp16, bf16, got 'int3'"),
    (["--eff-tasks", "no_such_task", "--eff-tasks-dir", str(REPO / "fixtures" / "tasks")],
     "*unknown lm-eval task(s) no_such_task: not in lm-eval's registry or in *fixtures/tasks*"),
    # tiny-gpt2 has 128 positions; run_grid's prompt is 16 tokens
    (["--eff-decode-tokens", "120"], "*model 'tiny-gpt2' takes at most 128 positions, but the latency workload needs "
                                     "16 prompt tokens (--eff-prefill-tokens, capped at --eff-context and "
                                     "--eff-max-tokens) + 120 generated (--eff-decode-tokens) = 136: lower them to at "
                                     "most 128 together (e.g. --eff-prefill-tokens 8)*"),
    (["--eff-batch-sizes", "1", "--eff-input-tokens", "100", "--eff-output-tokens", "64"],
     "*model 'tiny-gpt2' takes at most 128 positions, but the serving sweep needs 100 input tokens "
     "(--eff-input-tokens) + 64 output tokens (--eff-output-tokens) = 164: lower either*"),
    (["--eff-max-tokens", "40", "--eff-batch-sizes", "1,2", "--eff-input-tokens", "48", "--eff-output-tokens", "8"],
     "*serving prompts need 48 tokens (--eff-input-tokens); the evaluation text has 40 at most (--eff-max-tokens 40)"
     ": lower --eff-input-tokens to at most 40 or raise --eff-max-tokens*"),
], ids=["regression-nan", "regression-negative", "regression-without-history", "compare-last-without-history",
        "compare-missing-file", "compare-empty", "spaces-around-text-options", "spaces-only", "report-a-folder",
        "compute-dtype", "unknown-task", "decode-beyond-positions", "serving-beyond-positions",
        "serving-beyond-token-budget"])
def test_bad_input_found_only_after_the_run_is_refused_before_any_model_loads(
        pytester: pytest.Pytester, tiny_dir: Path, args: list[str], message: str) -> None:
    """Each was accepted and the grid measured; then the run failed at its end, or its cases lacked what was asked
    (an unknown task: no task phase and no accuracy threshold; a workload longer than the model's positions, or
    serving prompts longer than the token budget: no latency or serving figures)."""
    if "--eff-tasks" in args:
        pytest.importorskip("lm_eval")
    (pytester.path / "a-folder").mkdir()
    result, report = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32,bnb4", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert not report and "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_a_hub_model_longer_than_its_positions_is_refused_before_its_weights_download(
        pytester: pytest.Pytester, tiny_dir: Path, fake_hub: Any) -> None:
    """A hub model not in the HF cache: its config.json alone comes from the hub at the start (a local server
    answering as the hub does), and a decode workload past its positions is a usage error before any weight is
    fetched; before, the run downloaded the model and its case lacked latency figures."""
    from transformers import GPT2Config

    config = GPT2Config(n_positions=96, n_embd=64, n_layer=2, n_head=4).to_json_string().encode()
    hub = fake_hub("org/tiny-hub", {"config.json": config, "model.safetensors": b"must not be fetched"})
    pytester.makepyfile(test_grid=GRID_TEST)
    result = pytester.runpytest_subprocess(
        "--rootdir", str(pytester.path), "-p", "no:cacheprovider", "--benchmark-disable", "--eff-quiet",
        "--eff-models", "org/tiny-hub", "--eff-techniques", "fp32", "--eff-dataset", str(tiny_dir / "corpus.txt"),
        "--eff-max-tokens", "300", "--eff-context", "64", "--eff-stride", "32", "--eff-prefill-tokens", "16",
        "--eff-decode-tokens", "90", "--eff-cache-dir", str(tiny_dir / "cache"), "--eff-report", "run.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*model 'org/tiny-hub' takes at most 96 positions, but the latency workload needs "
                                 "16 prompt tokens (--eff-prefill-tokens, capped at --eff-context and "
                                 "--eff-max-tokens) + 90 generated*"])
    assert hub.files_fetched() == {"config.json"} and not (pytester.path / "run.json").exists()


def test_tasks_without_lm_eval_are_a_usage_error(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    pytester.makeconftest("import sys\nsys.modules['lm_eval'] = None\n")
    result, report = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32", "--eff-tasks", "eff_facts")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and not report
    result.stderr.fnmatch_lines(["*tasks eff_facts (--eff-tasks / ?tool.efficiency? tasks) need lm-evaluation-harness,"
                                 " which is not installed: pip install 'pytest-efficiency?quality?'*"])


def test_command_line_threshold_outside_the_grid_is_a_usage_error(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    result, _ = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32,bnb4", "--eff-threshold", "bnb44=5")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--eff-threshold for 'bnb44': not a technique of this run's grid*"])


def test_a_run_that_measured_nothing_fails_unless_allowed(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    result, _ = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32,bnb8", "-k", "compile")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    # what the grid held, and that other techniques are named, not selected (before: only "nothing measured")
    result.stdout.fnmatch_lines(["*-k 'compile' deselected every case of this run's grid on cpu (2: models "
                                 "tiny-gpt2; techniques fp32, bnb8)*--eff-techniques bf16+compile*"])
    pytester.makeconftest("import sys\nsys.modules['bitsandbytes'] = None\n")
    result, report = run_grid(pytester, tiny_dir, "--eff-baseline", "bnb8", "--eff-techniques", "bnb4")
    result.assert_outcomes(skipped=2)
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED  # before: exit 0, although nothing was measured
    result.stdout.fnmatch_lines(["*no efficiency case was measured*--eff-allow-empty*"])
    allowed, _ = run_grid(pytester, tiny_dir, "--eff-baseline", "bnb8", "--eff-techniques", "bnb4",
                          "--eff-allow-empty")
    assert allowed.ret == pytest.ExitCode.OK


def test_an_int4_group_the_layers_refuse_skips_the_case_before_its_model_loads(pytester: pytest.Pytester,
                                                                             tiny_dir: Path) -> None:
    """tiny-gpt2's 64-wide layers refuse int4wo's group 128: the case skips with the group that fits, read from the
    model's config. Before, each such case loaded the model first to learn it (its reports' load_s: 0.2-2.4 s for the
    random-weight GPU models of results 5b and 5l, 0.3-1.2 s for SmolLM2 on the CPU in 5k's run 5)."""
    pytester.makeconftest("""
import efficiency.runner as runner
_load = runner.load
def counted(source, *args, **kwargs):
    with open("loads.txt", "a") as f:
        f.write(source.name + "\\n")
    return _load(source, *args, **kwargs)
runner.load = counted
""")
    result, report = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32,int4wo")
    result.assert_outcomes(passed=1, skipped=1)
    case = next(c for c in report["cases"] if c["technique"] == "int4wo")
    assert case["status"] == "skipped" and "group size 128; int4wo-g64 fits every layer" in case["reason"]
    assert (pytester.path / "loads.txt").read_text().split() == ["tiny-gpt2"]  # the baseline's load only


def test_missing_ml_extra_is_a_clean_usage_error(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    pytester.makeconftest("import sys\nsys.modules['torch'] = None\n")
    result, _ = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*measuring stack is not installed (torch)*pip install 'pytest-efficiency?ml?'*"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_progress_lines_show_without_dash_s(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    pytester.makepyfile(test_grid=GRID_TEST)
    args = ["-p", "no:cacheprovider", "--benchmark-disable", "--eff-models", "tiny-gpt2", "--eff-model-dir",
            str(tiny_dir / "models"), "--eff-dataset", str(tiny_dir / "corpus.txt"), "--eff-max-tokens", "200",
            "--eff-context", "64", "--eff-rounds", "2", "--eff-decode-tokens", "3", "--eff-prefill-tokens", "16",
            "--eff-cache-dir", str(tiny_dir / "cache"), "--eff-techniques", "fp32"]
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1)
    # no energy meter on this machine: the line says why the rounds are not extended to a window (before: '>= 0 s')
    result.stdout.fnmatch_lines(["[[]efficiency[]] tiny-gpt2-fp32: loading *", "[[]efficiency[]] tiny-gpt2-fp32: *"
                                 "timed rounds (no energy meter here, so no minimum window)"])
    quiet = pytester.runpytest_subprocess(*args, "--eff-quiet")
    assert "[efficiency]" not in quiet.stdout.str() + quiet.stderr.str()


def test_grid_from_the_package_and_the_per_case_fixture(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    pytester.makepyfile(test_mine="""
def test_my_case(eff_measure):
    result = eff_measure("tiny-gpt2", "bnb8")
    assert result["status"] == "measured" and result["deltas"] and result["baseline"]["technique"] == "fp32"
""")
    common = ["-p", "no:cacheprovider", "--benchmark-disable", "--eff-quiet", "--eff-models", "tiny-gpt2",
              "--eff-model-dir", str(tiny_dir / "models"), "--eff-dataset", str(tiny_dir / "corpus.txt"),
              "--eff-max-tokens", "200", "--eff-context", "64", "--eff-rounds", "2", "--eff-decode-tokens", "3",
              "--eff-prefill-tokens", "16", "--eff-cache-dir", str(tiny_dir / "cache"), "--eff-report", "run.json"]
    common.insert(0, f"--rootdir={pytester.path}")
    mine = pytester.runpytest_subprocess(*common, "test_mine.py")
    mine.assert_outcomes(passed=1)
    # no grid case selected: the run does not say what it selected, so a comparison leaves no baseline case out
    assert "selected" not in json.loads((pytester.path / "run.json").read_text())
    grid = pytester.runpytest_subprocess(*common, "--eff-grid", "-m", "efficiency", "--eff-techniques", "fp32,bnb8",
                                         "-v")
    grid.assert_outcomes(passed=2, deselected=1)
    grid.stdout.fnmatch_lines(["*test_efficiency?tiny-gpt2-bnb8? PASSED*"])
    report = json.loads((pytester.path / "run.json").read_text())
    assert [c["technique"] for c in report["cases"]] == ["fp32", "bnb8"]
    assert report["selected"] == ["tiny-gpt2-bnb8", "tiny-gpt2-fp32"]


CHECKS_SLEEP = """
import time
from efficiency import checks

def sleep_in_checks(cfg):
    open("started", "w").close()
    time.sleep(120)

checks.check_before_loading = sleep_in_checks
"""


def _grid_stopped_in(pytester: pytest.Pytester, tiny_dir: Path, technique: str, *args: str,
                     stop: Any, in_phase: str | None = None, conftest: str | None = None) -> tuple[int, str]:
    """Run the tiny grid (fp32, bnb8, bnb4) in a process of its own whose ``technique`` case sleeps (before it
    starts, or in its phase ``in_phase``: the phase's class of efficiency.phases.latency), or that sleeps where
    ``conftest`` says; once it sleeps, ``stop(proc)``; returns (exit code, output)."""
    import subprocess
    import sys
    import time

    pytester.makepyfile(test_grid=GRID_TEST)
    if conftest is not None:
        pytester.makeconftest(conftest)
    elif in_phase is None:
        pytester.makeconftest(f"""
import time
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    if item.callspec.id.endswith("{technique}"):
        open("started", "w").close()
        time.sleep(120)
""")
    else:
        pytester.makeconftest(f"""
import time
from efficiency.phases import latency

run = latency.{in_phase}.run

def sleep_in_{technique}(self, model, ctx):
    if ctx.case_id.endswith("{technique}"):
        open("started", "w").close()
        time.sleep(120)
    return run(self, model, ctx)

latency.{in_phase}.run = sleep_in_{technique}
""")
    cmd = [sys.executable, "-m", "pytest", f"--rootdir={pytester.path}", "-p", "no:cacheprovider",
           "--benchmark-disable", "--eff-models", "tiny-gpt2",
           "--eff-model-dir", str(tiny_dir / "models"), "--eff-dataset", str(tiny_dir / "corpus.txt"),
           "--eff-max-tokens", "200", "--eff-context", "64", "--eff-rounds", "2", "--eff-decode-tokens", "3",
           "--eff-prefill-tokens", "16", "--eff-cache-dir", str(tiny_dir / "cache"), "--eff-report", "run.json",
           "--eff-techniques", "fp32,bnb8,bnb4", *args]
    proc = subprocess.Popen(cmd, cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not (pytester.path / "started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    stop(proc)
    try:
        out = proc.communicate(timeout=120)[0] or ""
    except ValueError:  # stop() closed the output
        out = ""
    proc.wait(timeout=120)
    return proc.returncode, out


def test_sigterm_is_handled_like_ctrl_c(pytester: pytest.Pytester, tiny_dir: Path) -> None:
    """CI cancels with SIGTERM: the report says interrupted, the history has the run, the exit is non-zero."""
    import os
    import signal

    code, out = _grid_stopped_in(pytester, tiny_dir, "bnb8", "--eff-quiet",
                                 stop=lambda proc: os.kill(proc.pid, signal.SIGTERM))
    assert code == pytest.ExitCode.INTERRUPTED, out
    report = json.loads((pytester.path / "run.json").read_text())
    assert report["status"] == "interrupted" and report["finished_at"]
    assert [c["technique"] for c in report["cases"]] == ["fp32"]
    assert "history: run 1 added to" in out and (pytester.path / "reports" / "history.sqlite").is_file()


def test_a_second_term_while_the_first_ends_the_run_leaves_it_interrupted(pytester: pytest.Pytester,
                                                                         tiny_dir: Path) -> None:
    """What `timeout` does to `benchmarks/gpu/run.sh`: TERM to the whole process group (the `tee` that reads the
    suite's output dies with it), and a second TERM from the script's trap. The second interrupted the orderly end
    and the run ended 'incomplete' here, exit 1; on the H200 the report stayed 'running' (docs/results.md 5j)."""
    import os
    import signal
    import time

    def group_then_trap(proc: Any) -> None:
        proc.stdout.close()  # the reader (tee) is gone
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)

    code, _ = _grid_stopped_in(pytester, tiny_dir, "bnb8", "--eff-history", "off", stop=group_then_trap)
    assert code != 0  # pytest itself exits 1, not 2, when its standard output is a broken pipe (console_main)
    report = json.loads((pytester.path / "run.json").read_text())
    assert report["status"] == "interrupted" and report["finished_at"]
    assert [c["technique"] for c in report["cases"]] == ["fp32"]


def test_a_case_interrupted_in_a_phase_keeps_what_its_earlier_phases_measured(pytester: pytest.Pytester,
                                                                             tiny_dir: Path) -> None:
    """Before: a case interrupted after its perplexity and timed passes was dropped whole: the report held the
    cases before it and nothing of its measured figures."""
    import os
    import signal

    code, out = _grid_stopped_in(pytester, tiny_dir, "bnb8", "--eff-history", "off", in_phase="DecodePhase",
                                 stop=lambda proc: os.kill(proc.pid, signal.SIGTERM))
    assert code == pytest.ExitCode.INTERRUPTED, out
    report = json.loads((pytester.path / "run.json").read_text())
    assert report["status"] == "interrupted"
    assert [(c["technique"], c["status"]) for c in report["cases"]] == [("fp32", "measured"), ("bnb8", "interrupted")]
    case = report["cases"][1]
    partial = case["partial"]
    assert case["reason"] == (f"the run was interrupted in the case's decode phase, after quality, ppl_pass, prefill, "
                              f"first_token; measured before it: perplexity {partial['perplexity']['value']:.6g}, "
                              f"timed pass {partial['runtime']['median_s']:.4g} s (all in 'partial')")
    assert case["phases_done"] == ["quality", "ppl_pass", "prefill", "first_token"]
    assert partial["perplexity"]["value"] > 1 and partial["runtime"]["median_s"] > 0
    # the latency phases that ended write no section of their own (decode writes it): their rounds are kept
    assert list(partial["phases"]) == case["phases_done"]
    assert partial["phases"]["prefill"]["median_s"] > 0 and partial["phases"]["first_token"]["rounds"] >= 1
    assert "!! KeyboardInterrupt: signal 15 (SIGTERM) !!" in out, out  # pytest's own banner, as before
    assert "CaseInterrupted" not in out
    assert "metrics" not in case and "deltas" not in case  # not a measured case: never scored nor compared
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "docs" / "report.schema.json").read_text())
    assert not list(jsonschema.Draft202012Validator(schema).iter_errors(report))


@pytest.mark.parametrize("collect_only", [False, True], ids=["run", "collect-only"])
def test_a_run_stopped_while_its_inputs_are_checked_leaves_an_interrupted_report(pytester: pytest.Pytester,
                                                                                 tiny_dir: Path,
                                                                                 collect_only: bool) -> None:
    """Before, SIGTERM during collection's checks (where a hub model's config.json is fetched) took its default
    action: the process died without pytest's summary, and ``--eff-report`` still held the previous run's report,
    read as this run's. A ``--collect-only`` run writes no report, interrupted or not."""
    import os
    import signal

    older = json.dumps({"status": "complete", "cases": ["an older run's"]})
    (pytester.path / "run.json").write_text(older)
    code, out = _grid_stopped_in(pytester, tiny_dir, "fp32", "--eff-history", "off",
                                 *(["--collect-only"] if collect_only else []), conftest=CHECKS_SLEEP,
                                 stop=lambda proc: os.kill(proc.pid, signal.SIGTERM))
    assert code == pytest.ExitCode.INTERRUPTED, out
    assert "!! KeyboardInterrupt: signal 15 (SIGTERM) !!" in out, out
    if collect_only:
        assert (pytester.path / "run.json").read_text() == older
        return
    report = json.loads((pytester.path / "run.json").read_text())
    assert report["status"] == "interrupted" and report["cases"] == [] and report["finished_at"]
    assert "interrupted before its first case" in report["environment"]["idle_power"]["reason"]


def test_a_run_interrupted_in_its_first_case_still_leaves_a_report(pytester: pytest.Pytester,
                                                                    tiny_dir: Path) -> None:
    """Before, a run stopped before its first case ended wrote no report at all: no trace that it ran."""
    import os
    import signal

    code, out = _grid_stopped_in(pytester, tiny_dir, "fp32", "--eff-quiet", "--eff-history", "off",
                                 stop=lambda proc: os.kill(proc.pid, signal.SIGTERM))
    assert code == pytest.ExitCode.INTERRUPTED, out
    report = json.loads((pytester.path / "run.json").read_text())
    assert report["status"] == "interrupted" and report["cases"] == [] and report["finished_at"]
    assert "interrupted before its first case" in report["environment"]["idle_power"]["reason"]
