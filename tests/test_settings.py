from __future__ import annotations

from pathlib import Path

import pytest

from efficiency.config import ConfigError
from efficiency.settings import build_config, parse_thresholds


def test_pyproject_table_and_command_line_precedence(tmp_path: Path) -> None:
    table = {"models": ["gpt2"], "techniques": ["fp32", "bnb4"], "context_cpu": 256,
             "thresholds": {"default": 10, "bnb4": 30}, "students": {"opt-1.3b": "my-opt-student"}}
    cfg = build_config({"device": "cpu", "techniques": "fp32,bnb8", "threshold": ["bnb8=7"]}, table, tmp_path)
    assert cfg.models == ("gpt2",) and cfg.techniques == ("fp32", "bnb8")
    assert cfg.workload.context == 256 and cfg.workload.stride == 256  # default stride capped at the context
    assert cfg.thresholds.limit_for("bnb4") == 30 and cfg.thresholds.limit_for("bnb8") == 7
    assert cfg.thresholds.default_pct == 10
    assert cfg.students == {"opt-1.3b": "my-opt-student"}
    assert cfg.reports_dir == tmp_path / "reports"


def test_explicit_stride_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stride"):
        build_config({"device": "cpu", "context": 128, "stride": 512}, {}, tmp_path)


def test_threshold_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="NAME=PCT"):
        parse_thresholds({}, ["bnb4=lots"])
    assert parse_thresholds({}, ["12.5"]).default_pct == 12.5
