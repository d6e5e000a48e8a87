"""The pytest adapter: ``--eff-*`` options, the model x technique parametrisation, fixtures, the summary
table and report writing. Deciding (deltas, scores, thresholds) is done by score.py and gate.py; measuring by
runner.py. Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from efficiency.config import ConfigError, SuiteConfig
from efficiency.settings import build_config, read_pyproject

if TYPE_CHECKING:
    from efficiency.session import EfficiencySession

OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("models", {"help": "comma-separated model names or folders (default: [tool.efficiency] models)"}),
    ("techniques", {"help": "comma-separated technique names; '+' joins a pipeline, e.g. fp16,bnb4,ah90+bnb4"}),
    ("baseline", {"help": "technique every case is compared with (default fp32 on CPU, fp16 on GPU)"}),
    ("device", {"help": "auto | cpu | cuda | cuda:N (default auto)"}),
    ("model-dir", {"help": "folder holding <name>/ model folders (HF format, .gguf, or config only); "
                           "env EFFICIENCY_MODEL_DIR"}),
    ("data-dir", {"help": "folder with wikitext-2-raw/wiki.test.raw (and wikitext-2/valid.txt for calibration); "
                          "env EFFICIENCY_DATA_DIR"}),
    ("dataset", {"help": "'wikitext2' (default) or a path to a UTF-8 text file to evaluate on"}),
    ("calibration", {"help": "text file for calibration / distillation (default <data-dir>/wikitext-2/valid.txt)"}),
    ("context", {"type": int, "help": "perplexity window in tokens (capped at the model's context)"}),
    ("stride", {"type": int, "help": "window stride in tokens (= context for non-overlapping windows)"}),
    ("max-tokens", {"help": "token budget of the evaluated prefix, or 'all' (default 4096 on CPU, all on GPU)"}),
    ("batch-size", {"type": int, "help": "windows per forward pass"}),
    ("prefill-tokens", {"type": int, "help": "prompt length for prefill latency"}),
    ("decode-tokens", {"type": int, "help": "generated tokens for decode time per token"}),
    ("rounds", {"type": int, "help": "minimum timed rounds of the perplexity pass"}),
    ("min-window", {"type": float, "help": "minimum energy window in seconds (default 10 with a real meter)"}),
    ("compute-dtype", {"help": "compute dtype for quantised techniques: fp32 | fp16 | bf16"}),
    ("threshold", {"action": "append", "help": "max perplexity increase: NAME=PCT for one technique or PCT for "
                                               "the default; repeatable"}),
    ("report", {"help": "also write the JSON report to this path"}),
    ("reports-dir", {"help": "folder for numbered run reports (default <rootdir>/reports)"}),
    ("cache-dir", {"help": "cache for downloads, tokens and technique results (default ~/.cache/pytest-efficiency)"}),
    ("random-weights", {"action": "store_true", "default": False,
                        "help": "build models from their config with random weights (timing/energy/memory only)"}),
    ("strict", {"action": "store_true", "default": False,
                "help": "fail, instead of skip, when a model or data is missing"}),
    ("quiet", {"action": "store_true", "default": False, "help": "no progress lines on stderr"}),
    ("history", {"metavar": "PATH", "help": "SQLite history every run is added to at session end "
                                            "(default <reports-dir>/history.sqlite; 'off' to disable)"}),
    ("compare", {"metavar": "PATH|last|COMMIT", "help": "compare this run with a report, 'last' (the last "
                 "complete clean run with the same settings and machine in the history) or a commit in it"}),
    ("fail-on-regression", {"type": float, "metavar": "PCT", "help": "fail the session on a significant "
                            "runtime/energy regression beyond PCT percent against --eff-compare (default last)"}),
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("efficiency", "pytest-efficiency: model x technique measurements")
    for name, kwargs in OPTIONS:
        group.addoption(f"--eff-{name}", dest=f"eff_{name.replace('-', '_')}", **kwargs)


@dataclass(frozen=True)
class Case:
    model: str
    technique: str

    @property
    def id(self) -> str:
        return f"{self.model}-{self.technique}"


session_key = pytest.StashKey["EfficiencySession"]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "efficiency: a model x technique case of pytest-efficiency")
    config.addinivalue_line("markers", "xdist_group(name): cases of one model run on one pytest-xdist worker")
    opts = {name.replace("-", "_"): config.getoption(f"eff_{name.replace('-', '_')}") for name, _ in OPTIONS}
    try:
        cfg = build_config(opts, read_pyproject(config.rootpath), config.rootpath)
    except (ConfigError, ValueError) as err:
        raise pytest.UsageError(f"pytest-efficiency: {err}") from err
    from efficiency.session import EfficiencySession

    state = EfficiencySession(cfg, config.rootpath, quiet=bool(opts["quiet"]))
    config.stash[session_key] = state
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: its cases travel to the controller
        state.worker_output = config.workeroutput  # type: ignore[attr-defined]
    elif config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistController(state), "efficiency-xdist")


class XdistController:
    """Registered only with pytest-xdist: collects each worker's cases into the controller's one report."""

    def __init__(self, state: EfficiencySession) -> None:
        self.state = state

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        cases = getattr(node, "workeroutput", {}).get("efficiency_cases")
        if cases:
            self.state.merge_worker_cases(cases)


def _session(config: pytest.Config) -> EfficiencySession:
    return config.stash[session_key]


def grid(cfg: SuiteConfig) -> list[Case]:
    """Every model x technique, the baseline first for each model (it is measured once and reused)."""
    techniques = [cfg.baseline] + [t for t in cfg.techniques if t != cfg.baseline]
    return [Case(m, t) for m in cfg.models for t in techniques]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "eff_case" not in metafunc.fixturenames:
        return
    cases = grid(_session(metafunc.config).cfg)
    # One model's cases share a worker under `-n N --dist loadgroup`, so its baseline is measured once.
    params = [pytest.param(c, id=c.id, marks=pytest.mark.xdist_group(c.model)) for c in cases]
    metafunc.parametrize("eff_case", params)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check technique names once the grid is collected (a usage error, not a collection error); only runs that
    collect efficiency cases pay for importing the techniques."""
    if not any("eff_case" in getattr(item, "fixturenames", ()) for item in items):
        return
    cfg = _session(config).cfg
    from efficiency.techniques.base import UnknownTechnique, parse

    for name in (cfg.baseline, *cfg.techniques):
        try:
            parse(name)
        except UnknownTechnique as err:
            raise pytest.UsageError(f"pytest-efficiency: {err}") from err


@pytest.fixture
def eff_case(request: pytest.FixtureRequest) -> Case:
    case: Case = request.param
    return case


@pytest.fixture
def eff_session(request: pytest.FixtureRequest) -> EfficiencySession:
    """The run's state: configuration, runner, baselines and report."""
    return _session(request.config)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(session_key, None)
    if state is not None:
        state.finish(exitstatus)
        from efficiency.report.tracking import on_sessionfinish

        on_sessionfinish(session, state.report, state.cfg.reports_dir)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(session_key, None)
    if state is None or not state.report.get("cases"):
        return
    from efficiency.report.render import terminal_table

    terminalreporter.write_sep("=", "pytest-efficiency")
    for line in terminal_table(state.report):
        terminalreporter.write_line(line)
    if state.written:
        terminalreporter.write_line("report: " + ", ".join(str(p) for p in state.written))
    from efficiency.report.tracking import terminal_lines

    for line in terminal_lines(config):  # history and --eff-compare
        terminalreporter.write_line(line)
