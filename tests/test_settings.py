from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from efficiency import defaults
from efficiency.config import ConfigError, Thresholds, Workload
from efficiency.settings import (
    build_config,
    canonical_config,
    default_cache_dir,
    parse_thresholds,
    read_pyproject,
    validate,
)

CPU = {"device": "cpu"}


def test_pyproject_table_and_command_line_precedence(tmp_path: Path) -> None:
    table = {"models": ["gpt2"], "techniques": ["fp32", "bnb4"], "cpu": {"context": 256},
             "thresholds": {"default": 10, "bnb4": 30}, "students": {"opt-1.3b": "my-opt-student"}}
    cfg = build_config({**CPU, "techniques": "fp32,bnb8", "threshold": ["bnb8=7"]}, table, tmp_path)
    assert cfg.models == ("gpt2",) and cfg.techniques == ("fp32", "bnb8")
    assert cfg.workload.context == 256 and cfg.workload.stride == 256  # default stride capped at the context
    assert cfg.thresholds.limit_for("bnb4") == 30 and cfg.thresholds.limit_for("bnb8") == 7
    assert cfg.thresholds.default_pct == 10
    assert cfg.students == {"opt-1.3b": "my-opt-student"}
    assert cfg.technique_options == {"distil": {"students": {"opt-1.3b": "my-opt-student"}}}
    assert cfg.reports_dir == tmp_path / "reports"


def test_keys_are_the_option_names_and_device_tables_override(tmp_path: Path) -> None:
    table = {"max-tokens": 256, "rounds": 5, "min-window": 2.5, "batch-size": 2,
             "cpu": {"max-tokens": 128}, "gpu": {"max-tokens": "all", "techniques": ["fp16"]}}
    cpu = build_config(CPU, table, tmp_path)
    assert (cpu.workload.max_tokens, cpu.workload.min_rounds, cpu.workload.min_window_s) == (128, 5, 2.5)
    assert cpu.workload.batch_size == 2 and cpu.techniques == tuple(defaults.WORKLOAD["cpu"]["techniques"])
    gpu = build_config({}, table, tmp_path, device="cuda")
    assert gpu.workload.max_tokens is None and gpu.techniques == ("fp16",) and gpu.baseline == "fp16"
    assert build_config(CPU, {"max-tokens": 256}, tmp_path).workload.max_tokens == 256


def test_defaults_come_from_one_place(tmp_path: Path) -> None:
    cfg = build_config(CPU, {}, tmp_path)
    assert cfg.workload.max_tokens == defaults.WORKLOAD["cpu"]["max-tokens"]
    assert cfg.workload.min_window_s == defaults.MIN_WINDOW_S == Workload().min_window_s
    assert cfg.thresholds.default_pct == defaults.THRESHOLD_PCT == Thresholds().default_pct


def test_the_default_cache_dir_is_one_function_honouring_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # benchmarks/heap_trim_timing.py had its own copy, which ignored XDG_CACHE_HOME
    monkeypatch.delenv("EFFICIENCY_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / defaults.CACHE_DIRNAME
    assert build_config(CPU, {}, tmp_path).cache_dir == default_cache_dir()


@pytest.mark.parametrize(("table", "message"), [
    ({"max_tokens": 256}, r"unknown key 'max_tokens' in \[tool.efficiency\] \(now spelled max-tokens\); valid keys:"),
    ({"max_tokens_cpu": 256}, r"'max_tokens_cpu'.*now spelled \[tool.efficiency.cpu\] max-tokens"),
    ({"min_rounds": 3}, r"'min_rounds'.*now spelled rounds"),
    ({"colour": "red"}, r"unknown key 'colour'.*valid keys: .*max-tokens"),
    ({"cpu": {"dataset": "x"}}, r"unknown key 'dataset' in \[tool.efficiency.cpu\]"),
    ({"thresholds": 5}, r"thresholds must be a table"),
    ({"technique": {"minitron-w25": 5}}, r"technique.'minitron-w25'. must be a table"),
    ({"rounds": 2.5}, r"rounds must be a whole number"),
    ({"min-window": float("nan")}, r"min-window must be a finite number"),
    ({"thresholds": {"bnb4": float("inf")}}, r"finite"),
    # wrongly typed values: before, a TypeError or AttributeError deep in the settings (INTERNALERROR, exit 3)
    ({"models": 5}, r"\[tool.efficiency\] models must be a list of names \(or one comma-separated string\), got 5"),
    ({"models": [1, 2]}, r"\[tool.efficiency\] models must be a list of names.*got \[1, 2\]"),
    ({"tasks": 5}, r"\[tool.efficiency\] tasks must be a list of names.*got 5"),
    ({"cpu": {"techniques": "fp32", "models": 7}}, r"\[tool.efficiency.cpu\] models must be a list of names.*got 7"),
    ({"data-dir": 5}, r"\[tool.efficiency\] data-dir must be a string, got 5"),
    ({"batch-sizes": [1, "a"]}, r"\[tool.efficiency\] batch-sizes must be a list of whole numbers.*got \[1, 'a'\]"),
    ({"batch-sizes": 5}, r"\[tool.efficiency\] batch-sizes must be a list of whole numbers.*got 5"),
    ({"cpu": {"thresholds": 5}}, r"\[tool.efficiency.cpu\] thresholds must be a table, got 5"),
    # before, the baseline loaded and was measured, then the quantised case failed on "unknown dtype 'int3'"
    ({"compute-dtype": "int3"}, r"\[tool.efficiency\] compute-dtype must be one of fp32, fp16, bf16, got 'int3'"),
    # numbers in quotes or booleans: before, read as the number ("3" -> 3, true -> 1.0 percent), against the README
    ({"rounds": "3"}, r"\[tool.efficiency\] rounds must be a whole number \(a TOML integer, without quotes\), "
                      r"got '3'"),
    ({"cpu": {"max-tokens": "256"}}, r"\[tool.efficiency.cpu\] max-tokens takes a number of tokens \(a TOML integer"),
    ({"min-window": "10"}, r"\[tool.efficiency\] min-window must be a number \(a TOML number, without quotes\)"),
    ({"thresholds": {"bnb4": "3"}}, r"threshold bnb4: a number of percent is needed \(a TOML number, without "
                                    r"quotes\), got '3'"),
    ({"thresholds": {"default": True}}, r"threshold default: a number of percent is needed.*got True"),
    ({"accuracy-thresholds": {"arc_easy": "2"}}, r"accuracy threshold arc_easy: a number of percent"),
])
def test_pyproject_errors_name_the_key(tmp_path: Path, table: dict[str, Any], message: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # CI sets EFFICIENCY_DATA_DIR and EFFICIENCY_CACHE_DIR: a folder key of the table is wrong there too (before:
    # `data-dir = 5` passed in CI, where the variable overrode it, and failed only on machines without it)
    monkeypatch.setenv("EFFICIENCY_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("EFFICIENCY_CACHE_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=message):
        validate(CPU, table, tmp_path)


@pytest.mark.parametrize(("opts", "message"), [
    ({"max_tokens": "0"}, r"--eff-max-tokens max-tokens must be at least 2 tokens, or 'all'"),
    ({"max_tokens": "lots"}, r"takes a number of tokens or 'all'"),
    ({"min_window": float("nan")}, r"--eff-min-window min-window must be a finite number"),
    ({"min_window": float("inf")}, r"finite"),
    ({"threshold": ["bnb4=inf"]}, r"--eff-threshold bnb4=inf: must be a finite"),
    ({"threshold": ["nan"]}, r"finite"),
    ({"context": 128, "stride": 512}, r"stride"),
])
def test_command_line_errors(tmp_path: Path, opts: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({**CPU, **opts}, {}, tmp_path)


@pytest.mark.parametrize("table", [
    {"context": 512, "stride": 1024},
    {"cpu": {"context": 512, "stride": 1024}},
    {"context": 512, "cpu": {"stride": 1024}},
])
def test_a_stride_set_beside_its_context_is_validated_not_capped(tmp_path: Path, table: dict[str, Any]) -> None:
    """Before, ``stride = 1024`` next to ``context = 512`` in pyproject.toml became 512 without a word."""
    with pytest.raises(ConfigError, match=r"stride must be in \[1, context=512\], got 1024"):
        build_config(CPU, table, tmp_path)


@pytest.mark.parametrize(("opts", "table"), [
    ({"context": 256}, {"stride": 512}),            # the option chose the context; the project's stride is capped
    ({}, {"stride": 512, "cpu": {"context": 256}}),  # the device table chose it
    ({"context": 256}, {}),                          # the built-in stride
    ({}, {"context": 256}),                          # the built-in stride under the project's context
])
def test_a_stride_set_less_specifically_than_the_context_means_non_overlapping(
        tmp_path: Path, opts: dict[str, Any], table: dict[str, Any]) -> None:
    cfg = build_config({**CPU, **opts}, table, tmp_path)
    assert (cfg.workload.context, cfg.workload.stride) == (256, 256)


@pytest.mark.parametrize("key", ["random-weights", "strict"])
@pytest.mark.parametrize("value", ["false", "no", "true", 0, 1])
def test_pyproject_switches_are_toml_booleans(tmp_path: Path, key: str, value: Any) -> None:
    """Before, ``bool("false")`` switched the option on (and random weights turned the perplexity gate off)."""
    with pytest.raises(ConfigError, match=rf"\[tool.efficiency\] {key} must be true or false \(a TOML boolean, "
                                          rf"without quotes\), got {value!r}"):
        validate(CPU, {key: value}, tmp_path)
    field = key.replace("-", "_")
    assert getattr(build_config(CPU, {key: True}, tmp_path), field) is True
    assert getattr(build_config(CPU, {key: False}, tmp_path), field) is False
    assert getattr(build_config({**CPU, field: True}, {key: False}, tmp_path), field) is True  # the option wins
    with pytest.raises(ConfigError, match=rf"{key} must be true or false"):  # before: the option hid the mistake
        validate({**CPU, field: True}, {key: value}, tmp_path)


def test_compute_dtype_names_are_checked_up_front_from_one_list(tmp_path: Path) -> None:
    from efficiency.techniques.precision import DTYPES

    assert tuple(DTYPES) == defaults.COMPUTE_DTYPES
    with pytest.raises(ConfigError, match=r"--eff-compute-dtype compute-dtype must be one of fp32, fp16, bf16, "
                                          r"got 'int3'"):
        validate({**CPU, "compute_dtype": "int3"}, {}, tmp_path)
    assert build_config({**CPU, "compute_dtype": "bf16"}, {}, tmp_path).compute_dtype == "bf16"


def test_typed_lists_accept_the_command_lines_strings_and_toml_lists(tmp_path: Path) -> None:
    cli = build_config({**CPU, "models": "a, b,a", "batch_sizes": "1,8"}, {}, tmp_path)
    toml = build_config(CPU, {"models": ["a", "b"], "batch-sizes": [1, 8]}, tmp_path)
    assert cli.models == toml.models == ("a", "b") and cli.serving.batch_sizes == toml.serving.batch_sizes == (1, 8)
    with pytest.raises(ConfigError, match=r"--eff-batch-sizes batch-sizes: '1,eight' must be comma-separated"):
        build_config({**CPU, "batch_sizes": "1,eight"}, {}, tmp_path)
    with pytest.raises(ConfigError, match=r"\[tool.efficiency\] device must be a string, got 5"):
        validate({}, {"device": 5}, tmp_path)  # before: AttributeError in resolve_device (INTERNALERROR)


def test_threshold_order_is_their_precedence(tmp_path: Path) -> None:
    """The plugin keeps the later of two spellings of one technique (settings.canonical_config): the command line
    after the device table after the top table after the built-in step limits."""
    table = {"thresholds": {"bnb8": 5, "bnb4": 30, "int8wo": 9}, "cpu": {"thresholds": {"bnb8": 6}}}
    cfg = build_config({**CPU, "threshold": ["bnb4=7"]}, table, tmp_path)
    assert list(cfg.thresholds.per_technique.items()) == [("compile", 1.0), ("int8wo", 9.0), ("bnb8", 6.0),
                                                          ("bnb4", 7.0)]


@pytest.mark.parametrize("table", [
    {"thresholds": {"bnb4-nf4": 3, "bnb4": 50}},
    {"thresholds": {"bnb4": 50, "bnb4-nf4": 3}},
    {"cpu": {"thresholds": {"fp32 + bnb4": 3, "fp32+bnb4": 50}}},
])
def test_two_spellings_of_one_technique_in_one_table_are_refused(tmp_path: Path, table: dict[str, Any]) -> None:
    """Before, the limit that held was the one whose key came later in the file: bnb4 was gated at 50 or 3
    percent by the order of two lines, without a word."""
    cfg = build_config({**CPU, "techniques": "fp32,bnb4"}, table, tmp_path)
    with pytest.raises(ConfigError, match=r"thresholds\] gives (bnb4|fp32\+bnb4) more than one limit, as "
                                          r"'.*' and '.*': keep one"):
        canonical_config(cfg)


def test_one_technique_in_two_tables_keeps_the_more_specific(tmp_path: Path) -> None:
    table = {"thresholds": {"bnb4": 50}, "cpu": {"thresholds": {"bnb4-nf4": 3}}}
    cfg = canonical_config(build_config({**CPU, "techniques": "fp32,bnb4"}, table, tmp_path))
    assert cfg.thresholds.limit_for("bnb4") == 3


def test_max_tokens_all_is_the_whole_split(tmp_path: Path) -> None:
    assert build_config({**CPU, "max_tokens": "all"}, {}, tmp_path).workload.max_tokens is None


def test_relative_paths_resolve_against_the_rootdir_and_the_invocation_dir(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EFFICIENCY_DATA_DIR", raising=False)
    monkeypatch.delenv("EFFICIENCY_MODEL_DIR", raising=False)
    sub = tmp_path / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    cfg = build_config(CPU, {"data-dir": "data", "reports-dir": "out", "dataset": "corpus.txt"}, tmp_path, cwd=sub)
    assert cfg.data_dir == tmp_path / "data" and cfg.reports_dir == tmp_path / "out"
    assert cfg.workload.dataset == str(tmp_path / "corpus.txt")
    cli = build_config({**CPU, "model_dir": "models", "report": "r.json"}, {}, tmp_path, cwd=sub)
    assert cli.model_dir == sub / "models" and cli.report_path == sub / "r.json"


def test_technique_tables_become_technique_options(tmp_path: Path) -> None:
    table = {"technique": {"minitron-w25": {"tokens": 50000}, "distil": {"students": {"a": "b"}}},
             "students": {"c": "d"}}
    cfg = build_config(CPU, table, tmp_path)
    assert cfg.technique_options["minitron-w25"] == {"tokens": 50000}
    assert cfg.students == {"c": "d", "a": "b"}


def test_read_pyproject_reports_bad_toml(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.efficiency\n")
    with pytest.raises(ConfigError, match="pyproject.toml"):
        read_pyproject(tmp_path)


def test_the_repositorys_own_table_is_valid() -> None:
    root = Path(__file__).resolve().parents[1]
    validate(CPU, read_pyproject(root), root)


def test_threshold_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="NAME=PCT"):
        parse_thresholds({}, ["bnb4=lots"])
    assert parse_thresholds({}, ["12.5"]).default_pct == 12.5


def test_batch_size_auto_is_none_and_the_gpu_default() -> None:
    from efficiency.settings import build_config

    root = Path(".")
    cpu = build_config({"batch_size": "auto"}, {}, root, device="cpu")
    assert cpu.workload.batch_size is None
    assert build_config({}, {}, root, device="cpu").workload.batch_size == 4
    assert build_config({}, {}, root, device="cuda").workload.batch_size is None
    with pytest.raises(ConfigError, match="batch-size"):
        build_config({"batch_size": "many"}, {}, root, device="cpu")


def test_the_projects_own_pyproject_lets_a_gpu_choose_its_perplexity_batch() -> None:
    """Regression: a top-level ``batch-size = 4`` in this repository's pyproject overrode the GPU default ``auto``,
    so GPU runs from the repository (benchmarks/gpu/run.sh) ran 4 windows per pass (H100 run of 2026-11-23)."""
    root = Path(__file__).resolve().parents[1]
    table = read_pyproject(root)
    assert build_config({}, table, root, device="cuda").workload.batch_size is None  # automatic
    assert build_config({}, table, root, device="cpu").workload.batch_size == 4


def test_the_projects_gpu_grid_has_compiled_cases_for_dash_k_compile() -> None:
    """`pytest benchmarks/ -k compile` on a GPU (issue 11's done-when) selects cases only if this repository's GPU
    grid has compiled pipelines; on the CPU the grid stays eager."""
    root = Path(__file__).resolve().parents[1]
    table = read_pyproject(root)
    gpu = build_config({}, table, root, device="cuda").techniques
    assert "bf16+compile" in gpu and any(t.endswith("+compile") and t != "bf16+compile" for t in gpu)
    assert not any("compile" in t for t in build_config({}, table, root, device="cpu").techniques)


@pytest.mark.slow
def test_the_projects_gpu_grid_quantises_every_layer_of_its_default_model(smollm2_folder: Path) -> None:
    """Regression: this repository's GPU grid asked for ``int4wo+compile`` (int4 group 128), which SmolLM2-135M's
    576-wide layers refuse, so `pytest benchmarks/ -k compile` on a GPU skipped its one low-bit case. Every case of
    the GPU grid must pass the layer checks of its steps on each default model (built on the meta device from the
    model's own config, no weights: models.skeleton), as the runner applies them before loading. ``smollm2_folder``
    skips the test where the default model cannot be had."""
    from conftest import shared_cache_dir
    from efficiency.models import resolve, skeleton
    from efficiency.techniques.base import parse

    root = Path(__file__).resolve().parents[1]
    cfg = build_config({}, read_pyproject(root), root, device="cuda")
    assert list(cfg.models) == ["smollm2-135m"], "the fixture makes the default model available"
    assert any("int4" in name for name in cfg.techniques), "the GPU grid has an int4 case"
    model = skeleton(resolve("smollm2-135m", cache_dir=shared_cache_dir()), shared_cache_dir())
    for name in cfg.techniques:
        parse(name).check_layers(lambda: model)
