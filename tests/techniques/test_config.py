"""Techniques as config objects: canonical names round-trip, options from pyproject, entry-point plugins,
budgets sized to the device, throttled progress."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from efficiency.errors import ConfigError, EfficiencyError, TechniqueUnavailable, Unavailable
from efficiency.techniques import base
from efficiency.techniques.base import UnknownTechnique, UnsupportedTechnique, parse, registrations
from efficiency.techniques.distil import TrainedStudent
from efficiency.techniques.kd import DEVICE_DEFAULTS, KdSettings
from efficiency.techniques.minitron import Minitron
from efficiency.techniques.progress import Progress

EXAMPLES = sorted({name for reg in registrations() for name in reg.examples})


def test_every_registration_has_examples() -> None:
    assert all(reg.examples for reg in registrations())
    assert len(EXAMPLES) >= 20


@pytest.mark.parametrize("name", EXAMPLES)
def test_name_round_trips(name: str) -> None:
    pipe = parse(name)
    assert parse(pipe.name) == pipe
    assert parse(parse(pipe.name).name).name == pipe.name  # canonical is a fixed point


@pytest.mark.parametrize("a", EXAMPLES[::3])
@pytest.mark.parametrize("b", ["bnb4", "distil-d50", "mag-2:4"])
def test_pipeline_names_round_trip_with_spaces(a: str, b: str) -> None:
    if parse(b).name in parse(a).name.split("+"):  # a step named twice: refused (test_composition)
        with pytest.raises(UnknownTechnique, match="a pipeline names each step once"):
            parse(f"{a} + {b}")
        return
    pipe = parse(f"{a} + {b}")
    assert pipe == parse(f"{a}+{b}") and parse(pipe.name) == pipe and " " not in pipe.name


def test_aliases_name_the_same_case() -> None:
    assert parse("bnb4-nf4") == parse("bnb4") and parse("bnb4-nf4").name == "bnb4"
    assert parse("ah90 + bnb4") == parse("ah90+bnb4") and parse("ah90 + bnb4").name == "ah90+bnb4"


@pytest.mark.parametrize("bad", ["", "+", "bnb4+", "bnb44", "ah90++bnb4", "  "])
def test_malformed_or_unknown_is_a_config_error(bad: str) -> None:
    with pytest.raises(UnknownTechnique) as info:
        parse(bad)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_error_hierarchy_and_old_names() -> None:
    assert UnsupportedTechnique is TechniqueUnavailable
    assert issubclass(TechniqueUnavailable, Unavailable) and issubclass(Unavailable, EfficiencyError)
    assert not issubclass(ConfigError, Unavailable)


# ------------------------------------------------------------------------------------------------ options


def test_options_set_nested_settings_by_plain_key() -> None:
    pipe = parse("ah90+minitron-w25", {"minitron-w25": {"tokens": 50000, "lr": 5e-4}})
    step = pipe.steps[1]
    assert isinstance(step, Minitron) and step.settings.tokens == 50000 and step.settings.lr == 5e-4
    assert pipe.name == "ah90+minitron-w25"
    assert parse(pipe.name, {"minitron-w25": {"tokens": 50000, "lr": 5e-4}}) == pipe  # round trip with options
    assert parse("minitron-w25").steps[0] != step  # options change the config, not the name


def test_options_apply_by_canonical_name() -> None:
    pipe = parse("bnb4", {"bnb4-nf4": {"threshold": 5, "double_quant": True}})
    step: Any = pipe.steps[0]
    assert step.double_quant is True and step.threshold == 5.0 and isinstance(step.threshold, float)
    other: Any = parse("bnb8", {"bnb4": {"double_quant": True}}).steps[0]
    assert other.double_quant is False  # a table for bnb4 does not touch bnb8


def test_dotted_key_and_top_level_fields() -> None:
    step: Any = parse("minitron-w25", {"minitron-w25": {"settings.cpu_tokens": 1024,
                                                        "importance_sequences": 4}}).steps[0]
    assert step.settings.cpu_tokens == 1024 and step.importance_sequences == 4


def test_unknown_option_names_key_and_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown option\(s\) tokenz.*valid: .*tokens"):
        parse("minitron-w25", {"minitron-w25": {"tokenz": 1}})


@pytest.mark.parametrize("values", [{"tokens": "many"}, {"tokens": True}, {"lr": "fast"}, {"tokens": 1.5}])
def test_wrong_type_is_a_config_error_naming_the_key(values: dict[str, Any]) -> None:
    key = next(iter(values))
    with pytest.raises(ConfigError, match=f"option '{key}' must be"):
        parse("distil-d50", {"distil-d50": values})


def test_invalid_value_and_renaming_are_refused() -> None:
    with pytest.raises(ConfigError, match="invalid options"):
        parse("distil-d50", {"distil-d50": {"tokens": 0}})
    with pytest.raises(ConfigError, match="rename it to 'distil-d50-rkl'"):
        parse("distil-d50", {"distil-d50": {"kl": "reverse"}})
    with pytest.raises(ConfigError, match="rename"):
        parse("minitron-w25", {"minitron-w25": {"remove_pct": 30}})


def test_options_for_unknown_technique_or_pipeline_key() -> None:
    with pytest.raises(UnknownTechnique):
        parse("bnb4", {"bnb44": {"threshold": 5.0}})
    with pytest.raises(ConfigError, match="one technique, not a pipeline"):
        parse("bnb4", {"ah90+bnb4": {"threshold": 5.0}})


def test_students_option_merges_over_the_defaults() -> None:
    step: Any = parse("distil", {"distil": {"students": {"opt-1.3b": "my-student"}}}).steps[0]
    assert dict(step.students) == {"gpt2": "distilgpt2", "opt-1.3b": "my-student"}
    with pytest.raises(ConfigError, match="students"):
        parse("distil", {"distil": {"students": {"opt-1.3b": 3}}})


# ----------------------------------------------------------------------------------------------- plugins


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    registrations()  # built-ins loaded
    monkeypatch.setattr(base, "_PATTERNS", list(base._PATTERNS))
    monkeypatch.setattr(base, "_loaded", {"builtin": True, "plugins": False})


def fake_distribution(root: Path, module: str, source: str, ep_name: str = "fake") -> None:
    dist = root / "fake_eff_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-eff-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[pytest_efficiency.techniques]\n{ep_name} = {module}\n")
    (root / f"{module}.py").write_text(source)


PLUGIN = '''
from dataclasses import dataclass
from efficiency.techniques.base import TechniqueBase, register

@dataclass(frozen=True)
class Noop(TechniqueBase):
    level: int = 1

    @property
    def name(self):
        return f"noop{self.level}"

    def apply(self, model, ctx):
        ctx.info[self.name] = {"applied": True}
        return model

@register(r"noop(\\d)", "noopN", examples=("noop1",))
def _noop(m):
    return Noop(int(m.group(1)))
'''


def test_third_party_technique_registers_through_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    fake_distribution(tmp_path, "fake_eff_plugin_mod", PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_eff_plugin_mod", raising=False)
    pipe = parse("ah90 + noop3")
    assert pipe.name == "ah90+noop3" and parse(pipe.name) == pipe
    assert "noopN" in base.known_patterns()
    with pytest.raises(ConfigError, match="unknown option"):
        parse("noop3", {"noop3": {"levels": 2}})


def test_broken_plugin_error_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None) -> None:
    fake_distribution(tmp_path, "fake_eff_broken_mod", "raise RuntimeError('no GPU library')\n", ep_name="broken")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"plugin 'broken' \(fake_eff_broken_mod, from fake-eff-plugin 1.0\).*"
                                         "no GPU library"):
        parse("bnb4")


# ------------------------------------------------------------------------------------- budgets, progress


def test_training_budget_follows_the_device() -> None:
    s = KdSettings()
    cpu, gpu = s.for_device("cpu"), s.for_device("cuda:0")
    assert cpu.tokens == DEVICE_DEFAULTS["cpu"]["tokens"] < gpu.tokens == 200_000
    assert cpu.batch == DEVICE_DEFAULTS["cpu"]["batch_size"] and gpu.batch == 8
    assert KdSettings(tokens=50_000).for_device("cpu").tokens == 50_000  # explicit wins everywhere
    assert KdSettings(cpu_tokens=1024).for_device("cpu").tokens == 1024
    assert KdSettings(cpu_tokens=1024).for_device("cuda").tokens == 200_000
    with pytest.raises(ValueError, match="device"):
        _ = KdSettings().steps


def test_cpu_budget_option_reaches_the_step() -> None:
    step: Any = parse("distil-d50", {"distil-d50": {"cpu_tokens": 2048, "batch_size": 2}}).steps[0]
    assert isinstance(step, TrainedStudent)
    assert step.settings.for_device("cpu").steps == 2048 // (2 * 256)


def test_progress_is_throttled_and_has_an_eta() -> None:
    now = [0.0]
    lines: list[str] = []
    p = Progress(lines.append, "minitron-w25: training", 100, "steps", every_s=5.0, clock=lambda: now[0])
    for step in range(1, 101):
        now[0] += 0.5  # 0.5 s per step: 50 s in all
        p.update(step, "loss 1.0")
    assert len(lines) <= 50 / 5 + 2
    assert lines[0].startswith("minitron-w25: training: 1/100 steps (1%)") and "ETA" not in lines[0]
    assert "ETA" not in lines[-1] and lines[-1].startswith("minitron-w25: training: 100/100 steps (100%)")
    assert "ETA" in lines[1] and "loss 1.0" in lines[1]
    step, left = int(lines[1].split(": ")[2].split("/")[0]), lines[1].split("ETA ")[1].split(",")[0]
    assert left == f"{round(0.5 * (100 - step))}s"


def test_the_eta_leaves_out_the_first_units_one_time_costs() -> None:
    """The eager fp16 pass of results 5m: a first window of 7 s (CUDA's start-up), then 0.024 s a window. Before,
    that pass's first line said ETA 14m25s, and the old rule gives this test's 7 s first window ETA 14m42s
    (7 s x 126), for a pass that ended 3 s later."""
    now = [0.0]
    lines: list[str] = []
    p = Progress(lines.append, "opt-1.3b-fp16: perplexity pass", 127, "windows", every_s=1.0, clock=lambda: now[0])
    now[0] = 7.0
    p.update(1)
    for done in range(2, 128):
        now[0] += 0.024
        p.update(done)
    assert "ETA" not in lines[0]
    eta_s = [int(line.split("ETA ")[1].rstrip("s")) for line in lines[1:-1]]
    assert eta_s and all(e <= 3 for e in eta_s)
