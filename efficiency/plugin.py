"""The pytest adapter: ``--eff-*`` options, the model x technique parametrisation, fixtures, the summary
table and report writing. Deciding (deltas, scores, thresholds) is done by score.py and gate.py; measuring by
runner.py.

Light by design: a pytest run that collects no efficiency case never imports torch. The configuration is
validated at start-up without a device; the device is resolved, the technique names are made canonical, and the
inputs and outputs are checked, only once efficiency cases are collected, before any model loads. All state lives
in one :class:`PluginState` under :data:`state_key`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from efficiency import defaults
from efficiency.config import ConfigError, SuiteConfig
from efficiency.settings import build_config, canonical_config, read_pyproject, validate

if TYPE_CHECKING:
    from efficiency.session import EfficiencySession

_CPU = defaults.WORKLOAD["cpu"]
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
    ("max-tokens", {"help": f"token budget of the evaluated prefix (at least 2), or 'all' for the whole split "
                            f"(default {_CPU['max-tokens']} on CPU, all on GPU)"}),
    ("batch-size", {"help": "windows per forward pass of the perplexity pass, or 'auto' (chosen from the model and "
                           "free memory; the GPU default)"}),
    ("prefill-tokens", {"type": int, "help": "prompt length for prefill latency (capped at --eff-context, "
                                             "--eff-max-tokens and the model's positions)"}),
    ("decode-tokens", {"type": int, "help": "generated tokens for decode time per token"}),
    ("rounds", {"type": int, "help": "minimum timed rounds of the perplexity pass"}),
    ("min-window", {"type": float, "help": f"minimum energy window in seconds when a real meter reads the energy "
                                           f"(default {defaults.MIN_WINDOW_S:g})"}),
    ("compute-dtype", {"help": "compute dtype for quantised techniques: fp32 | fp16 | bf16"}),
    ("threshold", {"action": "append", "help": "max perplexity increase: NAME=PCT for one technique of the grid or "
                                               "PCT for the default; repeatable"}),
    ("report", {"help": "also write the JSON report to this path"}),
    ("reports-dir", {"help": "folder for numbered run reports (default <rootdir>/reports)"}),
    ("cache-dir", {"help": "cache for downloads, tokens and technique results (default "
                           "$XDG_CACHE_HOME/pytest-efficiency, else ~/.cache/pytest-efficiency)"}),
    ("random-weights", {"action": "store_true", "default": False,
                        "help": "build models from their config with random weights (timing/energy/memory only)"}),
    ("strict", {"action": "store_true", "default": False,
                "help": "fail, instead of skip, when a known model or the data is not available here"}),
    ("quiet", {"action": "store_true", "default": False, "help": "no progress lines"}),
    ("allow-empty", {"action": "store_true", "default": False,
                     "help": "exit 0 even when no efficiency case was measured (all skipped or deselected)"}),
    ("tasks", {"help": "lm-evaluation-harness tasks run on every case, comma-separated (pyproject: tasks = [...])"}),
    ("tasks-dir", {"help": "folder of local lm-eval task YAMLs (offline tasks), added to lm-eval's include path"}),
    ("task-limit", {"type": int, "help": "at most N documents per task (a quick run)"}),
    ("accuracy-threshold", {"action": "append", "metavar": "TASK=POINTS", "help": "largest accuracy drop in points "
                            "against the baseline before a case fails; repeatable"}),
    ("kld-tokens", {"type": int, "help": "KL divergence against the baseline on the first N evaluation tokens "
                                         "(default 4096; 0 turns it off)"}),
    ("batch-sizes", {"help": "serving sweep: batched generation at each batch size, e.g. 1,8,32"}),
    ("input-tokens", {"type": int, "help": "serving sweep: prompt length (default 128)"}),
    ("output-tokens", {"type": int, "help": "serving sweep: generated tokens per sequence (default 64)"}),
    ("devices", {"metavar": "auto|cuda:0,cuda:1,...", "help": "pin each pytest-xdist worker to one device: gw0 to "
                 "the first entry, gw1 to the second, ... (its CUDA_VISIBLE_DEVICES); needs -n N with N <= entries "
                 "and implies --dist loadgroup; 'auto' = every visible GPU; cuda:0+cuda:1 gives one worker two GPUs "
                 "(with --eff-device-map); cpu entries give a worker no GPU"}),
    ("device-map", {"metavar": "auto|balanced", "help": "split each model across the GPUs the process sees "
                    "(accelerate device_map; energy and peak memory over exactly those GPUs); techniques that "
                    "rebuild layers on one device skip with the reason"}),
    ("shard", {"metavar": "I/N", "help": "run shard I of N of the grid (deterministic, a model's cases together); "
                                         "merge the shard reports with `efficiency merge`"}),
    ("grid", {"action": "store_true", "default": False,
              "help": "add the packaged model x technique grid test (efficiency.grid) to the collected tests"}),
    ("history", {"metavar": "PATH", "help": "SQLite history every run is added to at session end "
                                            "(default <reports-dir>/history.sqlite; 'off' to disable)"}),
    ("compare", {"metavar": "PATH|last|COMMIT", "help": "compare this run with a report, 'last' (the last "
                 "complete clean run with the same settings and machine in the history) or a commit in it"}),
    ("fail-on-regression", {"type": float, "metavar": "PCT", "help": "fail the session on a significant "
                            "runtime/energy regression beyond PCT percent against --eff-compare (default last)"}),
]
# Options build_config does not read (the plugin and report/tracking.py do).
_NOT_CONFIG = ("quiet", "allow-empty", "grid", "shard", "devices", "history", "compare", "fail-on-regression")
GRID_COLUMNS = "min,median,max,rounds"  # pytest-benchmark's table for the grid, unless --benchmark-columns is given
NOTHING_MEASURED = pytest.ExitCode.NO_TESTS_COLLECTED


def option_text(value: str) -> str:
    """A text option's value without the spaces around it (``--eff-history " off"`` had become a history file
    named " off", ``--eff-compare " last"`` a commit that was never found). Spaces alone are refused: stripped,
    they would read as the option left out (``--eff-shard " "`` from an unset CI variable ran the whole grid)."""
    text = value.strip()
    if value and not text:
        raise argparse.ArgumentTypeError("a value of spaces only: give a value, or leave the option out")
    return text


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("efficiency", "pytest-efficiency: model x technique measurements")
    for name, kwargs in OPTIONS:
        if "type" not in kwargs and kwargs.get("action", "store") in ("store", "append"):
            kwargs = {**kwargs, "type": option_text}
        group.addoption(f"--eff-{name}", dest=f"eff_{name.replace('-', '_')}", **kwargs)


@dataclass(frozen=True)
class Case:
    model: str
    technique: str

    @property
    def id(self) -> str:
        return f"{self.model}-{self.technique}"


@dataclass
class PluginState:
    """Everything the plugin keeps for one pytest run (one stash key)."""

    config: pytest.Config
    opts: dict[str, Any]
    table: dict[str, Any]
    root: Path  # the project folder: its pyproject.toml's [tool.efficiency], its reports/ (project_root)
    _cfg: SuiteConfig | None = None
    canonical: bool = False  # the technique names of _cfg are canonical (canonical_names)
    config_error: ConfigError | None = None
    session: EfficiencySession | None = None
    collected: bool = False  # efficiency cases were collected in this run
    checked: bool = False  # inputs and outputs checked
    previous_sigterm: Any = None
    sigterm_installed: bool = False
    notes: list[str] = field(default_factory=list)
    expected: set[str] = field(default_factory=set)  # ids of the efficiency cases selected in this run
    deselected: list[Case] = field(default_factory=list)  # efficiency cases -k / -m deselected
    shard: tuple[int, int] | None = None  # --eff-shard I/N
    assignments: list[Any] = field(default_factory=list)  # --eff-devices, controller: devices.Assignment per worker
    assignment: Any = None  # --eff-devices, worker: this worker's devices.Assignment
    xdist_cases: dict[str, Case] = field(default_factory=dict)  # xdist controller: the workers' node id -> case

    @property
    def cfg(self) -> SuiteConfig:
        """The run's configuration, built (and the device resolved) on first use."""
        if self._cfg is None:
            self._cfg = build_config(self.opts, self.table, self.root, self.config.invocation_params.dir)
        return self._cfg

    def canonical_names(self) -> SuiteConfig:
        """From here on :attr:`cfg` has canonical technique names (:func:`canonical_config`); called where the grid
        is first needed (collection, the first case, the xdist controller's first report), never in a run without
        efficiency cases: the technique registry imports torch."""
        if not self.canonical:
            check_measuring_stack()
            self._cfg = canonical_config(self.cfg, list(self.opts.get("threshold") or []))
            self.canonical = True
        return self.cfg

    def get_session(self) -> EfficiencySession:
        if self.session is None:
            from efficiency.session import EfficiencySession

            self.session = EfficiencySession(self.cfg, self.root, log=make_log(self.config), shard=self.shard)
            if hasattr(self.config, "workerinput"):  # a pytest-xdist worker: its cases travel to the controller
                self.session.worker_output = self.config.workeroutput  # type: ignore[attr-defined]
            if self.expected:
                self.session.expect(self.expected)
        return self.session

    # Kept for code written against the session object in the stash (report/tracking tests plant a report).
    @property
    def report(self) -> dict[str, Any]:
        return self.get_session().report

    @report.setter
    def report(self, value: dict[str, Any]) -> None:
        self.get_session().report = value


state_key = pytest.StashKey[PluginState]()
session_key = state_key  # the old name


def make_log(config: pytest.Config) -> Callable[[str], None]:
    """Progress lines through pytest's terminal reporter, outside the output capture (visible without -s);
    silent with --eff-quiet. On a pytest-xdist worker (no terminal) they go to stderr."""
    if config.getoption("eff_quiet"):
        return lambda msg: None
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or hasattr(config, "workerinput"):
        return lambda msg: print(f"[efficiency] {msg}", file=sys.__stderr__, flush=True)

    def log(msg: str) -> None:
        if capman is not None:
            with capman.global_and_fixture_disabled():
                reporter.write_line(f"[efficiency] {msg}")
        else:
            reporter.write_line(f"[efficiency] {msg}")

    return log


def _opts(config: pytest.Config) -> dict[str, Any]:
    return {n.replace("-", "_"): config.getoption(f"eff_{n.replace('-', '_')}") for n, _ in OPTIONS
            if n not in _NOT_CONFIG}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "efficiency: a model x technique case of pytest-efficiency")
    config.addinivalue_line("markers", "xdist_group(name): cases of one model run on one pytest-xdist worker")
    opts = _opts(config)
    root, misled = project_root(config)
    if misled:
        config.issue_config_time_warning(pytest.PytestConfigWarning(misled), stacklevel=2)
    try:
        table = read_pyproject(root)
        validate(opts, table, root, config.invocation_params.dir)  # no device, no torch
        if config.getoption("eff_fail_on_regression") is not None:
            from efficiency.report.tracking import check_fail_pct

            check_fail_pct(config.getoption("eff_fail_on_regression"))
    except ConfigError as err:
        raise pytest.UsageError(f"pytest-efficiency: {err}") from err
    state = PluginState(config, opts, table, root)
    if config.getoption("eff_shard"):
        from efficiency.shard import parse_shard

        try:
            state.shard = parse_shard(config.getoption("eff_shard"))
        except ValueError as err:
            raise pytest.UsageError(f"pytest-efficiency: --eff-shard: {err}") from err
    config.stash[state_key] = state
    if config.getoption("eff_devices"):
        try:
            _configure_devices(config, state)
        except ConfigError as err:
            raise pytest.UsageError(f"pytest-efficiency: {err}") from err
    if not hasattr(config, "workerinput") and config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistController(state), "efficiency-xdist")
    if hasattr(config, "workerinput"):
        config.pluginmanager.register(XdistWorker(), "efficiency-xdist-worker")


def project_root(config: pytest.Config) -> tuple[Path, str | None]:
    """(the project folder, why it is not pytest's rootdir or None): the folder whose pyproject.toml holds
    ``[tool.efficiency]`` and under which ``reports/`` goes, which is pytest's rootdir, except where pytest chose
    that from the value of a plugin's option. pytest finds its rootdir before it loads plugins, so in
    ``--eff-history ../cache/history.sqlite`` (the value apart from its option) the value reads as a path to test;
    an existing one moved the rootdir to the common folder of it and the working directory, where no pyproject.toml
    is, and the run silently ignored the project's settings and thresholds. Here pytest's own rootdir search runs
    again on the arguments as parsed with every plugin's options known; where it differs, that rootdir is the
    project's (with the reason, for a warning). ``--rootdir`` and ``-c`` are taken as given."""
    if config.getoption("rootdir", None) or config.getoption("inifilename", None):
        return config.rootpath, None
    try:
        from _pytest.config.findpaths import determine_setup  # pytest's own search, so that both agree otherwise

        known = config.known_args_namespace
        given: dict[str, Any] = {"inifile": None, "override_ini": getattr(known, "override_ini", None),
                                 "args": [str(a) for a in known.file_or_dir], "rootdir_cmd_arg": None,
                                 "invocation_dir": config.invocation_params.dir}
        params = inspect.signature(determine_setup).parameters
        found = Path(determine_setup(**{k: v for k, v in given.items() if k in params})[0])
    except Exception:  # a pytest whose private search differs: keep its rootdir
        return config.rootpath, None
    if found == config.rootpath:
        return config.rootpath, None
    return found, (f"pytest-efficiency: pytest chose the rootdir {config.rootpath} from the value of an option given "
                   "apart from its name (it reads plugin options' values as paths before plugins load); this run's "
                   f"[tool.efficiency] and reports/ are those of {found}. Write the option as --eff-NAME=PATH, or "
                   "pass --rootdir, so that pytest agrees.")


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(state_key, None)
    if state is None:
        return
    if state.sigterm_installed:
        signal.signal(signal.SIGTERM, state.previous_sigterm)
        state.sigterm_installed = False
    del config.stash[state_key]


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    # Once: a second TERM (the group's and a script's trap passing it on, as `timeout` and benchmarks/gpu/run.sh do)
    # must not interrupt the orderly end that writes the report; KILL still ends a run that hangs there.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")


def _install_sigterm(state: PluginState) -> None:
    """SIGTERM (what CI sends on timeout or cancel) takes pytest's Ctrl-C path: the report is marked
    interrupted, the history gets its row, the exit status is non-zero. Main process and thread only."""
    if state.sigterm_installed or hasattr(state.config, "workerinput"):
        return
    if threading.current_thread() is not threading.main_thread():
        return
    state.previous_sigterm = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    state.sigterm_installed = True


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM received inside the block take effect when it ends (main thread only; other threads
    cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)  # the handler now in place: KeyboardInterrupt (or the default action)


def _configure_devices(config: pytest.Config, state: PluginState) -> None:
    """--eff-devices. Controller: plan worker -> device, put each worker's CUDA_VISIBLE_DEVICES into its
    pytest-xdist spec (set in the new process before anything imports torch), force --dist loadgroup. Worker:
    take the planned device as --eff-device (and set CUDA_VISIBLE_DEVICES if the spec did not)."""
    import os

    from efficiency import devices

    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        planned = workerinput.get("efficiency_devices")
        if planned is None:
            return
        a = devices.Assignment.from_dict(planned)
        if os.environ.get(devices.ENV) != a.cuda_visible_devices:
            torch_mod = sys.modules.get("torch")
            if torch_mod is not None and torch_mod.cuda.is_initialized():
                raise ConfigError(f"worker {a.worker}: CUDA was initialised before {devices.ENV} could be set to "
                                  f"{a.cuda_visible_devices!r}; it would measure on the wrong GPU")
            os.environ[devices.ENV] = a.cuda_visible_devices
        state.assignment = a
        state.opts["device"] = a.device
        # A worker parses the original command line: without this its test ids carry no @group suffix and the
        # controller's loadgroup scheduler would spread one model's cases over several workers.
        config.option.loadgroup = True
        return
    if state.opts.get("device"):
        raise ConfigError("--eff-devices and --eff-device exclude each other: --eff-devices gives every worker "
                          "its device")
    if not config.pluginmanager.hasplugin("xdist"):
        raise ConfigError("--eff-devices pins pytest-xdist workers to devices: pip install pytest-xdist and give "
                          "-n N")
    slots = devices.parse_devices(config.getoption("eff_devices"))
    tx = [spec for item in (config.getoption("tx") or []) for spec in _expand_tx(item)]
    state.assignments = devices.plan(slots, len(tx))
    if any("+" in a.entry for a in state.assignments) and not state.opts.get("device_map"):
        raise ConfigError("--eff-devices: a GPU group (cuda:0+cuda:1) is for a model split across its GPUs: add "
                          "--eff-device-map auto|balanced")
    config.option.tx = devices.pinned_tx(tx, state.assignments)
    config.option.dist = devices.required_dist(config.getoption("dist"))
    state.opts["device"] = devices.controller_device(slots)


def _expand_tx(spec: str) -> list[str]:
    """pytest-xdist's ``N*spec`` shorthand, one spec per worker."""
    count, star, rest = spec.partition("*")
    return [rest] * int(count) if star and count.isdigit() else [spec]


XDIST_IDLE_REASON = ("not measured on the pytest-xdist controller (its workers may be measuring meanwhile); each "
                     "case's net energy uses its own worker's idle reading")


REPORT_CASES = "efficiency_cases"  # the test report attribute a worker's ended cases travel in (JSON)


class XdistWorker:
    """Registered on pytest-xdist workers: the group suffix after xdist's own collection hook (see
    group_suffix_items), and each case sent to the controller as soon as it ends."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        group_suffix_items(config, items)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: Any) -> Any:
        """The cases recorded during this test phase ride on its report: pytest serialises a report's extra
        attributes and pytest-xdist sends it to the controller at once. A worker's ``workeroutput`` travels only
        when the worker finishes, which an interrupted or killed worker never does."""
        report = yield
        state = item.config.stash.get(state_key, None)
        cases = state.session.take_outbox() if state is not None and state.session is not None else []
        if cases:
            import json

            setattr(report, REPORT_CASES, json.dumps(cases))
        return report


def xdist_case_map(state: PluginState, nodeids: Iterable[str]) -> dict[str, Case]:
    """On the pytest-xdist controller, which collects nothing itself: the efficiency cases among the node ids a
    worker selected (after -k / -m). A case's node id is ``<test>[<model>-<technique>]``, with pytest-xdist's
    ``@<group>`` suffix under --dist loadgroup; the ids are matched against the grid for either device. The
    workers' ids carry canonical technique names (``bnb4-nf4`` is collected as ``bnb4``), which take the technique
    registry, and so torch, to compute: the names as given are tried first, and the canonical ones only where a
    node id names a model of the grid, so that a run without efficiency cases resolves no device and imports no
    torch."""
    params = [(nodeid, m.group(1)) for nodeid in nodeids if (m := _PARAM_ID.match(nodeid))]
    configs: list[SuiteConfig] = []
    for device in ("cpu", "cuda"):
        try:
            configs.append(build_config(state.opts, state.table, state.root, state.config.invocation_params.dir,
                                        device=device))
        except ConfigError:
            continue
    known = {c.id: c for cfg in configs for c in grid(cfg)}
    models = {m for cfg in configs for m in cfg.models}
    if any(param not in known and any(param.startswith(f"{m}-") for m in models) for _, param in params):
        cli_thresholds = list(state.opts.get("threshold") or [])
        for cfg in configs:
            try:
                known.update((c.id, c) for c in grid(canonical_config(cfg, cli_thresholds)))
            except (ConfigError, ImportError):  # the workers refuse it with the reason (no torch: the stack check)
                continue
    return {nodeid: known[param] for nodeid, param in params if param in known}


_PARAM_ID = re.compile(r"^.*?\[(.*)\](?:@[^\]]*)?$")


class XdistController:
    """Registered only with pytest-xdist: collects each worker's cases into the controller's one report as they
    end, knows which cases the workers selected (a case whose worker died is named, and the run is not
    ``complete``), takes SIGTERM as an interrupt like a run without workers, and with --eff-devices tells each
    worker its planned device."""

    def __init__(self, state: PluginState) -> None:
        self.state = state

    def pytest_xdist_node_collection_finished(self, node: Any, ids: Sequence[str]) -> None:
        found = xdist_case_map(self.state, ids)
        if not found:
            return
        self.state.xdist_cases.update(found)
        self.state.expected |= {c.id for c in found.values()}
        if self.state.session is not None:
            self.state.session.expect(self.state.expected)
        _install_sigterm(self.state)
        _controller_report(self.state)  # now, while no worker measures yet

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        cases = getattr(report, REPORT_CASES, None)
        if cases:
            _controller_report(self.state)
            self.state.get_session().merge_worker_cases(cases)

    def pytest_handlecrashitem(self, crashitem: str, report: pytest.TestReport, sched: Any) -> None:
        case = self.state.xdist_cases.get(crashitem)
        if case is None:
            return
        _controller_report(self.state)
        self.state.get_session().record_crash(case.id, case.model, case.technique, str(report.longrepr))

    def pytest_configure_node(self, node: Any) -> None:
        if not self.state.assignments:
            return
        from efficiency.devices import ENV, assignment_for_env

        a = assignment_for_env(self.state.assignments, node.gateway.spec.env.get(ENV))
        if a is not None:  # a restarted worker has a new id but the same spec, hence the same device
            node.workerinput["efficiency_devices"] = {**a.to_dict(), "worker": node.gateway.id}

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        cases = getattr(node, "workeroutput", {}).get("efficiency_cases")  # sent again: kept once
        if cases:
            _controller_report(self.state)
            self.state.get_session().merge_worker_cases(cases)


def _queued_worker_cases(config: pytest.Config) -> list[str]:
    """On an interrupted pytest-xdist controller: the cases that reached it but still wait in pytest-xdist's
    event queue (the interrupt ended the loop that takes them), so that the report keeps them too."""
    q = getattr(config.pluginmanager.getplugin("dsession"), "queue", None)
    if q is None or not hasattr(q, "mutex"):
        return []
    with q.mutex:
        events = list(q.queue)
    found = []
    for event in events:
        name, kwargs = event if isinstance(event, tuple) and len(event) == 2 else ("", {})
        if name == "testreport":
            cases = getattr(kwargs.get("rep"), REPORT_CASES, None)
        elif name == "workerfinished":
            cases = (getattr(kwargs.get("node"), "workeroutput", None) or {}).get("efficiency_cases")
        else:
            continue
        if cases:
            found.append(cases)
    return found


def _controller_report(state: PluginState) -> None:
    """The controller's report, started without an idle-power reading (workers may be measuring) and, with
    --eff-devices, with the worker -> device plan. Started once the workers' collection names efficiency cases,
    before any is measured: the first start resolves the device and may import torch, which must neither take
    CPU from a measuring worker nor be cut by an interrupt (a half-imported torch leaves no report)."""
    if state.session is not None and state.session.report:
        return
    from efficiency.devices import SHARED_CPU_REASON

    with _interrupts_deferred():
        if state.session is None:
            state.canonical_names()  # the settings the report records are the workers' (their grid's names)
        session = state.get_session()
        session._ensure_report(idle_power={"power_w": None, "reason": XDIST_IDLE_REASON})
        workers = len(state.config.getoption("tx") or [])
        session.report["environment"]["devices"] = {
            "workers": [a.to_dict() for a in state.assignments],
            "dist": state.config.getoption("dist"),
            "cpu_energy": SHARED_CPU_REASON.format(n=workers) if workers > 1 else None,
        }


def _state(config: pytest.Config) -> PluginState:
    return config.stash[state_key]


def grid(cfg: SuiteConfig) -> list[Case]:
    """Every model x technique, the baseline first for each model (it is measured once and reused)."""
    techniques = [cfg.baseline] + [t for t in cfg.techniques if t != cfg.baseline]
    return [Case(m, t) for m in cfg.models for t in techniques]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "eff_case" not in metafunc.fixturenames:
        return
    state = _state(metafunc.config)
    state.collected = True
    try:
        cases = grid(state.canonical_names())
    except ConfigError as err:  # reported as a usage error once collection is done
        state.config_error = err
        cases = []
    if state.shard is not None:  # a deterministic 1/N of the grid, each model's cases together
        from efficiency.shard import shard

        by_model: dict[str, list[str]] = {}
        for c in cases:
            by_model.setdefault(c.model, []).append(c.id)
        mine = set(shard(by_model, *state.shard))
        cases = [c for c in cases if c.id in mine]
    # One model's cases share a worker under `-n N --dist loadgroup`, so its baseline is measured once.
    params = [pytest.param(c, id=c.id, marks=[pytest.mark.xdist_group(c.model), pytest.mark.efficiency])
              for c in cases]
    metafunc.parametrize("eff_case", params)


def _has_cases(items: list[pytest.Item]) -> bool:
    return any("eff_case" in getattr(item, "fixturenames", ()) for item in items)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """--eff-grid: the packaged grid test (efficiency/grid.py) joins the collected items, before -k / -m select.

    It is collected here, not by adding its path to the arguments: an installed package lives inside a virtual
    environment, and pytest never collects paths inside one (a non-editable install would collect nothing)."""
    grid_path = Path(__file__).with_name("grid.py")
    if config.getoption("eff_grid") and not any(Path(str(i.path)) == grid_path for i in items):
        grid_module = pytest.Module.from_parent(session, path=grid_path)
        items.extend(item for item in session.genitems(grid_module) if isinstance(item, pytest.Item))
    _check_collected(session, config, items)


def _check_collected(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Once efficiency cases are collected, refuse bad input before any model loads (usage errors, exit 4):
    the measuring stack, technique and threshold names, model names, the dataset, and the outputs."""
    state = _state(config)
    if not (_has_cases(items) or state.collected):
        return
    _install_sigterm(state)  # before the checks: fetching a hub model's config.json there can take a while
    try:
        check_before_loading(state)
    except ConfigError as err:
        raise pytest.UsageError(f"pytest-efficiency: {err}") from err
    _narrow_benchmark_table(config)


def group_suffix_items(config: pytest.Config, items: list[pytest.Item]) -> int:
    """On a pytest-xdist worker under ``--dist loadgroup``: give each efficiency case's node id its
    ``@<model>`` suffix when pytest-xdist's own could not (pytest >= 9.2 keeps node ids in a structured field
    that xdist 3.8 does not update: pytest-xdist issue #1386), so that one model's cases share a worker and its
    baseline is measured once. Returns how many ids were changed."""
    if not hasattr(config, "workerinput") or not config.getvalue("loadgroup"):
        return 0
    changed = 0
    for item in items:
        case = getattr(getattr(item, "callspec", None), "params", {}).get("eff_case")
        nodeid = item.nodeid
        if not isinstance(case, Case) or nodeid.rfind("@") > nodeid.rfind("]"):
            continue
        new_id = f"{nodeid}@{case.model}"
        if hasattr(item, "_id"):
            from _pytest.nodeid import coerce_node_id  # pytest >= 9.2: the structured node id

            item._id = coerce_node_id(new_id)
        else:
            setattr(item, "_nodeid", new_id)  # noqa: B010 (pytest < 9.2: the legacy field xdist also writes)
        changed += 1
    return changed


def pytest_collection_finish(session: pytest.Session) -> None:
    """The cases selected after -k / -m: a run that measures fewer is ``incomplete`` (session.run_status)."""
    state = _state(session.config)
    params = (getattr(getattr(item, "callspec", None), "params", {}).get("eff_case") for item in session.items)
    state.expected = {case.id for case in params if isinstance(case, Case)}  # called even after a usage error
    if state.session is not None and state.expected:
        state.session.expect(state.expected)


def pytest_deselected(items: list[pytest.Item]) -> None:
    """Remember the efficiency cases -k / -m deselect, so a run they emptied can say what its grid held."""
    if not items:
        return
    state = items[0].config.stash.get(state_key, None)
    if state is None:
        return
    for item in items:
        case = getattr(getattr(item, "callspec", None), "params", {}).get("eff_case")
        if isinstance(case, Case):
            state.deselected.append(case)


def deselection_note(state: PluginState) -> str | None:
    """Why a run measured nothing when -k / -m deselected every case of its grid: which cases the grid held and
    that other techniques are named, not selected (on a CPU `-k compile` selects nothing from the default grid)."""
    if state.expected or not state.deselected:
        return None
    option = state.config.option
    how = " ".join(f"{flag} {value!r}" for flag, value in (("-k", getattr(option, "keyword", "")),
                                                           ("-m", getattr(option, "markexpr", ""))) if value)
    models = list(dict.fromkeys(c.model for c in state.deselected))
    techniques = list(dict.fromkeys(c.technique for c in state.deselected))
    return (f"{how or '-k / -m'} deselected every case of this run's grid on {state.cfg.device} "
            f"({len(state.deselected)}: models {', '.join(models)}; techniques {', '.join(techniques)}). -k and -m "
            "select among the grid's cases; other cases are named with --eff-models / --eff-techniques "
            "(e.g. --eff-techniques bf16+compile) or in [tool.efficiency] of pyproject.toml; `efficiency list` "
            "shows the names")


def check_before_loading(state: PluginState) -> None:
    """Refuse bad input (ConfigError, a usage error) before any model loads: the run's inputs
    (efficiency.checks.check_before_loading), then what only a pytest run has: xdist device sharing, outputs."""
    if state.checked:
        return
    if state.config_error is not None:
        raise state.config_error
    cfg = state.canonical_names()
    _check_device_sharing(state)
    from efficiency import checks

    checks.check_before_loading(cfg)  # what needs no pytest; api.measure_case makes the same checks
    _check_outputs(state)
    state.checked = True


def check_measuring_stack() -> None:
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError("efficiency cases were collected but the measuring stack is not installed "
                          f"({', '.join(missing)}): pip install 'pytest-efficiency[ml]'")


def _check_device_sharing(state: PluginState) -> None:
    """On a pytest-xdist worker: never two measured cases on one GPU at once, and the --eff-devices pinning
    took effect (CUDA sees exactly the planned GPUs)."""
    from efficiency.devices import worker_count

    cfg = state.cfg
    if not hasattr(state.config, "workerinput") or not cfg.device.startswith("cuda"):
        return
    a = state.assignment
    if a is None:
        if worker_count() > 1:
            raise ConfigError(f"-n {worker_count()} on {cfg.device} without --eff-devices would run measured cases "
                              "of several workers on one GPU at once: give --eff-devices auto (one GPU per worker)")
        return
    import torch

    expected = len([x for x in a.cuda_visible_devices.split(",") if x.strip()])
    seen = torch.cuda.device_count()
    if seen != expected:
        raise ConfigError(f"worker {a.worker} sees {seen} GPU(s) but was pinned to {a.cuda_visible_devices!r} "
                          f"({expected}): CUDA_VISIBLE_DEVICES took no effect")


def _check_outputs(state: PluginState) -> None:
    if hasattr(state.config, "workerinput"):
        return  # the controller writes the report and the history
    from efficiency.report.io import check_writable
    from efficiency.report.tracking import check_baseline_spec, history_path

    cfg = state.cfg
    targets: list[tuple[str, Path, bool]] = [("reports folder", cfg.reports_dir, True)]
    if cfg.report_path is not None:
        targets.append(("--eff-report", cfg.report_path, False))
    db = history_path(state.config.getoption("eff_history"), cfg.reports_dir)
    if db is not None:
        targets.append(("history", db, False))
    for what, path, is_dir in targets:
        problem = check_writable(path, is_dir)
        if problem:
            raise ConfigError(f"{what} {path} is not writable ({problem}); nothing was measured")
    check_baseline_spec(state.config.getoption("eff_history"), state.config.getoption("eff_compare"),
                        state.config.getoption("eff_fail_on_regression"), cfg.reports_dir)


def _narrow_benchmark_table(config: pytest.Config) -> None:
    """pytest-benchmark's default table has a dozen columns per row; the grid needs few (its own table has
    the rest). Kept when the user chose --benchmark-columns."""
    if "--benchmark-columns" in " ".join(config.invocation_params.args):
        return
    bench = getattr(config, "_benchmarksession", None)  # where pytest-benchmark keeps its session object
    if bench is not None and hasattr(bench, "columns"):
        bench.columns = GRID_COLUMNS.split(",")


@pytest.fixture
def eff_case(request: pytest.FixtureRequest) -> Case:
    case: Case = request.param
    return case


@pytest.fixture
def eff_session(request: pytest.FixtureRequest) -> EfficiencySession:
    """The run's state: configuration, runner, baselines and report."""
    state = _state(request.config)
    try:
        check_before_loading(state)
    except ConfigError as err:
        pytest.fail(f"pytest-efficiency: {err}", pytrace=False)
    state.collected = True
    _install_sigterm(state)
    return state.get_session()


@pytest.fixture
def eff_measure(eff_session: EfficiencySession) -> Callable[..., dict[str, Any]]:
    """Measure one case in your own test: ``result = eff_measure("gpt2", "bnb4")`` returns the case's result
    (perplexity, runtime, energy, memory, deltas against the model's baseline, scores) and adds it to the run's
    report. Pass pytest-benchmark's ``benchmark`` fixture as ``benchmark=`` to time the rounds through it."""

    def measure(model: str, technique: str, benchmark: Any = None) -> dict[str, Any]:
        return eff_session.run_case(model, technique, benchmark)

    return measure


def _measured(report: dict[str, Any]) -> int:
    return sum(1 for c in report.get("cases", []) if c.get("status") == "measured")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(state_key, None)
    if state is None:
        return
    empty_run = (state.collected and not hasattr(session.config, "workerinput")
                 and not session.config.option.collectonly
                 and not session.config.getoption("eff_allow_empty")
                 and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)
                 and (state.session is None or _measured(state.session.report) == 0))
    if empty_run:
        session.exitstatus = NOTHING_MEASURED
        state.notes.append("no efficiency case was measured (all skipped or deselected): exit "
                           f"{int(NOTHING_MEASURED)}; --eff-allow-empty accepts such a run")
        hint = deselection_note(state)
        if hint:
            state.notes.append(hint)
    if state.xdist_cases and session.exitstatus == pytest.ExitCode.INTERRUPTED:
        _controller_report(state)  # interrupted before a case ended: a report says so, not silence
        for cases in _queued_worker_cases(session.config):
            state.get_session().merge_worker_cases(cases)
    if (state.collected and state.session is None and session.exitstatus == pytest.ExitCode.INTERRUPTED
            and not hasattr(session.config, "workerinput") and not session.config.option.collectonly):
        state.get_session()  # interrupted before its first case began: a report says so, and replaces an older one
    if state.session is not None:
        stopped_early = bool(session.shouldfail or session.shouldstop)  # -x / --maxfail
        state.session.finish(int(session.exitstatus), stopped_early=stopped_early)
        from efficiency.report.tracking import on_sessionfinish

        on_sessionfinish(session, state.session.report, state.session.cfg.reports_dir)
        if state.session.write_errors:  # measurements kept (fallback file), but the run must not pass silently
            state.notes.extend(state.session.write_errors)
            if state.session.fallback_path is not None:
                state.notes.append(f"the report was written to {state.session.fallback_path} instead")
            if session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(state_key, None)
    if state is None:
        return
    report = state.session.report if state.session is not None else {}
    if not report.get("cases") and not state.notes:
        return
    terminalreporter.write_sep("=", "pytest-efficiency")
    if report.get("cases"):
        from efficiency.report.render import terminal_table

        for line in terminal_table(report):
            terminalreporter.write_line(line)
        if state.session is not None and state.session.written:
            terminalreporter.write_line("report: " + ", ".join(str(p) for p in state.session.written))
        from efficiency.report.env import busy_warning

        warning = busy_warning((report.get("environment") or {}).get("load") or {})
        if warning:
            terminalreporter.write_line(f"WARNING: {warning}", yellow=True)
        from efficiency.report.tracking import terminal_lines

        for line in terminal_lines(config):  # history and --eff-compare
            terminalreporter.write_line(line)
    for note in state.notes:
        terminalreporter.write_line(note, red=True)
