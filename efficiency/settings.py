"""From the edges (``[tool.efficiency]`` in pyproject.toml, environment, ``--eff-*`` options) to a SuiteConfig.

Precedence: command line > environment (folders only) > ``[tool.efficiency.cpu|gpu]`` > ``[tool.efficiency]`` >
the built-in defaults of :mod:`efficiency.defaults`. Keys of the pyproject table are the option names without
``--eff-`` (``max-tokens``, ``rounds``, ``min-window``, ...); unknown keys are errors. Relative paths in
pyproject.toml resolve against the rootdir (the folder holding it); relative paths on the command line against
the folder pytest was started in. Nothing here imports torch unless the device is ``auto`` or ``cuda``.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from efficiency import defaults
from efficiency.config import ConfigError, SuiteConfig, Thresholds, Workload

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Keys a device table ([tool.efficiency.cpu] / [tool.efficiency.gpu]) may hold; the top level may hold them too.
DEVICE_KEYS = (*defaults.WORKLOAD["cpu"], "models", "compute-dtype")
QUALITY_KEYS = ("tasks", "tasks-dir", "task-limit", "kld-tokens", "batch-sizes", "input-tokens", "output-tokens")
TOP_KEYS = (*DEVICE_KEYS, *QUALITY_KEYS, "device", "dataset", "calibration", "model-dir", "data-dir", "cache-dir",
            "reports-dir", "random-weights", "strict")
TABLES = ("cpu", "gpu", "thresholds", "technique", "students", "accuracy-thresholds")
PATH_KEYS = ("calibration", "model-dir", "data-dir", "cache-dir", "reports-dir", "tasks-dir")
INT_KEYS = ("context", "stride", "prefill-tokens", "decode-tokens", "rounds")

# Keys of the first pyproject layout and where their value lives now.
RENAMED = {
    "max_tokens_cpu": "[tool.efficiency.cpu] max-tokens",
    "max_tokens_gpu": "[tool.efficiency.gpu] max-tokens",
    "context_cpu": "[tool.efficiency.cpu] context",
    "context_gpu": "[tool.efficiency.gpu] context",
    "baseline_cpu": "[tool.efficiency.cpu] baseline",
    "baseline_gpu": "[tool.efficiency.gpu] baseline",
    "gpu_techniques": "[tool.efficiency.gpu] techniques",
    "min_window_s_gpu": "[tool.efficiency.gpu] min-window",
    "min_rounds": "rounds",
}


def default_cache_dir() -> Path:
    """Where downloads, token ids and technique results go without ``--eff-cache-dir`` / ``EFFICIENCY_CACHE_DIR``:
    ``$XDG_CACHE_HOME/pytest-efficiency``, or ``~/.cache/pytest-efficiency``."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / defaults.CACHE_DIRNAME


def read_pyproject(root: Path) -> dict[str, Any]:
    path = root / "pyproject.toml"
    if not path.is_file():
        return {}
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {err}") from err
    table = data.get("tool", {}).get("efficiency", {})
    return dict(table) if isinstance(table, dict) else {}


def _unknown_key(key: str, where: str, valid: tuple[str, ...]) -> ConfigError:
    hint = RENAMED.get(key)
    if hint is None and key.replace("_", "-") in valid:
        hint = key.replace("_", "-")
    new = f" (now spelled {hint})" if hint else ""
    return ConfigError(f"unknown key {key!r} in {where}{new}; valid keys: {', '.join(valid)}")


def check_table(table: Mapping[str, Any]) -> None:
    """Unknown keys anywhere in ``[tool.efficiency]`` are errors naming them and the valid ones."""
    for key, value in table.items():
        if key in TABLES:
            if not isinstance(value, Mapping):
                raise ConfigError(f"[tool.efficiency] {key} must be a table, got {value!r}")
        elif key not in TOP_KEYS:
            raise _unknown_key(key, "[tool.efficiency]", (*TOP_KEYS, *TABLES))
    for device in ("cpu", "gpu"):
        for key, value in table.get(device, {}).items():
            if key == "thresholds":
                if not isinstance(value, Mapping):
                    raise ConfigError(f"[tool.efficiency.{device}] thresholds must be a table, got {value!r}")
            elif key not in DEVICE_KEYS:
                raise _unknown_key(key, f"[tool.efficiency.{device}]", DEVICE_KEYS)
    for name, options in dict(table.get("technique", {})).items():
        if not isinstance(options, Mapping):
            raise ConfigError(f"[tool.efficiency.technique.{name!r}] must be a table of options, got {options!r}")


def _names(value: Any, key: str, source: str) -> tuple[str, ...]:
    """A list of names, or one string of comma-separated names (the command line's form); each once."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        items = list(value)
    else:
        raise ConfigError(f"{source} {key} must be a list of names (or one comma-separated string), got {value!r}")
    return tuple(dict.fromkeys(item.strip() for item in items if item.strip()))


def _text(value: Any, key: str, source: str) -> str | None:
    """A string value (a name, a path), or None when not given."""
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{source} {key} must be a string, got {value!r}")
    return value


def _flag(value: Any, key: str, source: str) -> bool:
    """A pyproject switch: a TOML boolean. ``"false"`` is a non-empty string, which ``bool()`` would read as on."""
    if not isinstance(value, bool):
        raise ConfigError(f"{source} {key} must be true or false (a TOML boolean, without quotes), got {value!r}")
    return value


def _compute_dtype(value: Any, source: str) -> str | None:
    name = _text(value, "compute-dtype", source)
    if name is not None and name not in defaults.COMPUTE_DTYPES:
        raise ConfigError(f"{source} compute-dtype must be one of {', '.join(defaults.COMPUTE_DTYPES)}, "
                          f"got {name!r}")
    return name


def _int_list(value: Any, key: str, source: str) -> tuple[int, ...]:
    """A list of whole numbers, or one comma-separated string of them (the command line's form)."""
    from efficiency.phases.quality_settings import parse_int_list

    if isinstance(value, str):
        try:
            return parse_int_list(value)
        except ConfigError as err:
            raise ConfigError(f"{source} {key}: {err}") from None
    if isinstance(value, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return tuple(value)
    raise ConfigError(f"{source} {key} must be a list of whole numbers (or one comma-separated string such as "
                      f"'1,8,32'), got {value!r}")


def _pct(value: Any, what: str) -> float:
    """A number of percent: a TOML number (a quoted "3" or a boolean is a mistake, never read as 3 or 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what}: a number of percent is needed (a TOML number, without quotes), got {value!r}")
    pct = float(value)
    if not math.isfinite(pct):
        raise ConfigError(f"{what}: must be a finite number of percent, got {value!r}")
    return pct


def _last(entries: dict[str, Any], name: str, value: Any) -> None:
    """Set ``name`` and move it to the end: the order of ``entries`` is their precedence."""
    entries.pop(name, None)
    entries[name] = value


def parse_thresholds(table: Mapping[str, Any], cli: list[str]) -> Thresholds:
    """``cli`` entries are ``NAME=PCT`` (one technique) or ``PCT`` (the default for all). The built-in step limits
    (``defaults.STEP_THRESHOLDS_PCT``) come first, so that the table and the command line override them and the
    report's settings record them with the rest. ``per_technique`` is in order of precedence (built-in, table,
    command line): where two spellings name one technique (``bnb4``, ``bnb4-nf4``) the plugin keeps the later
    (canonical_config)."""
    per = dict(defaults.STEP_THRESHOLDS_PCT)
    for k, v in table.items():
        if k != "default":
            _last(per, str(k), _pct(v, f"threshold {k}"))
    default = _pct(table.get("default", defaults.THRESHOLD_PCT), "threshold default")
    for item in cli:
        name, sep, value = item.rpartition("=")
        try:
            pct = float(value)
        except ValueError:
            raise ConfigError(f"--eff-threshold takes NAME=PCT or PCT, got {item!r}") from None
        pct = _pct(pct, f"--eff-threshold {item}")
        if sep:
            _last(per, name, pct)
        else:
            default = pct
    return Thresholds(default, per)


def cli_threshold_names(cli: list[str]) -> tuple[str, ...]:
    return tuple(item.rpartition("=")[0] for item in cli if "=" in item)


def threshold_names_outside(names: tuple[str, ...], techniques: tuple[str, ...]) -> list[str]:
    """Names that are neither a technique of the grid nor a step of a pipeline in it (canonical names: the plugin
    checks them once it has the registry, canonical_config)."""
    known = set(techniques) | {step.strip() for t in techniques for step in t.split("+")}
    return [n for n in names if n not in known]


def resolve_device(requested: str | None) -> str:
    if requested in (None, "", "auto"):
        try:
            import torch
        except ImportError:
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    assert requested is not None
    if requested.startswith("cuda"):
        try:
            import torch
        except ImportError:
            raise ConfigError(f"--eff-device {requested}: torch is not installed") from None
        if not torch.cuda.is_available():
            raise ConfigError(f"--eff-device {requested} requested but CUDA is not available on this machine "
                              f"(torch {torch.__version__}); use --eff-device cpu or auto")
    return requested


def _path(value: Any, base: Path | None) -> Path | None:
    if value in (None, ""):
        return None
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() or base is None else base / path


def _max_tokens(value: Any, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() == "all":
            return None
        if not _from_command_line(source):
            raise ConfigError(f"{source} max-tokens takes a number of tokens (a TOML integer, without quotes) or "
                              f"'all', got {value!r}")
        try:
            value = int(value)
        except ValueError:
            raise ConfigError(f"{source} max-tokens takes a number of tokens or 'all', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ConfigError(f"{source} max-tokens must be at least 2 tokens, or 'all' for the whole split; "
                          f"got {value!r}")
    return value


def _batch_size(value: Any, source: str) -> int | None:
    """Windows per forward pass: a whole number, or ``auto`` (None: chosen from the model and free memory)."""
    if isinstance(value, str) and value.strip().lower() == "auto" or value is None:
        return None
    return _int(value, "batch-size", source)


def _from_command_line(source: str) -> bool:
    """Whether a value came from an ``--eff-*`` option, a string by nature; pyproject values have TOML types."""
    return source.startswith("--")


def _int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{source} {key} must be a whole number, got {value!r}")
    if isinstance(value, str) and not _from_command_line(source):
        raise ConfigError(f"{source} {key} must be a whole number (a TOML integer, without quotes), got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{source} {key} must be a whole number, got {value!r}") from None


def _float(value: Any, key: str, source: str) -> float:
    if isinstance(value, str) and not _from_command_line(source):
        raise ConfigError(f"{source} {key} must be a number (a TOML number, without quotes), got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source} {key} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(out):
        raise ConfigError(f"{source} {key} must be a finite number, got {value!r}")
    return out


def technique_options(table: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``[tool.efficiency.technique."<name>"]`` tables; the legacy ``[tool.efficiency.students]`` table becomes
    ``technique_options["distil"]["students"]``."""
    out = {str(name): dict(options) for name, options in dict(table.get("technique", {})).items()}
    legacy = {str(k): str(v) for k, v in dict(table.get("students", {})).items()}
    if legacy:
        distil = out.setdefault("distil", {})
        distil["students"] = {**legacy, **dict(distil.get("students", {}))}
    return out


def _source_rank(source: str) -> int:
    """How specific a setting's source is: the built-in default < ``[tool.efficiency]`` < its device table <
    the command line."""
    if source.startswith("--"):
        return 3
    return 2 if source.startswith("[tool.efficiency.") else 1 if source == "[tool.efficiency]" else 0


def _stride(stride: int, stride_source: str, context: int, context_source: str) -> int:
    """The stride of the perplexity windows. One set where the context was chosen more specifically (the default
    512 under ``--eff-context 256``) means "non-overlapping" and is capped at the context; one set at the same level
    as the context or a more specific one is the user's and is validated (``stride = 1024`` beside ``context =
    512`` in one table was capped silently before)."""
    if stride > context and _source_rank(stride_source) < _source_rank(context_source):
        return context
    return stride


def build_config(opts: Mapping[str, Any], table: Mapping[str, Any], root: Path, cwd: Path | None = None,
                 device: str | None = None) -> SuiteConfig:
    """``opts``: option values by name without the ``eff_`` prefix, underscores for dashes (None = not given).
    ``cwd``: where relative command-line paths resolve (default: as given). ``device``: use this device instead
    of resolving ``--eff-device`` (validation of both device tables without importing torch)."""
    check_table(table)
    check_grid = device is None
    device_value, device_source = ((opts["device"], "--eff-device") if opts.get("device") else
                                   (table.get("device"), "[tool.efficiency]"))
    requested = _text(device_value, "device", device_source)
    if device is None:
        device = resolve_device(requested)
    kind = "gpu" if device.startswith("cuda") else "cpu"
    device_table = dict(table.get(kind, {}))
    merged = {**defaults.WORKLOAD[kind], "models": list(defaults.MODELS), "dataset": defaults.DATASET,
              **{k: v for k, v in table.items() if k not in TABLES}, **device_table}
    sources = {k: f"[tool.efficiency.{kind}]" if k in device_table else "[tool.efficiency]" if k in table
               else "default" for k in merged}

    def pick(key: str) -> tuple[Any, str]:
        value = opts.get(key.replace("-", "_"))
        if value is not None:
            return value, f"--eff-{key}"
        return merged.get(key), sources.get(key, "default")

    def keyed(key: str) -> tuple[Any, str, str]:
        """(value, key, source): the arguments of the value checks."""
        value, source = pick(key)
        return value, key, source

    def flag(key: str) -> bool:
        """A switch: on when its option is given, else the pyproject's boolean (off by default). The pyproject
        value is checked where the option is given too (as path_pick does; before, the option hid a quoted one)."""
        configured = _flag(merged.get(key, False), key, "[tool.efficiency]")
        return bool(opts.get(key.replace("-", "_"))) or configured

    def path_pick(key: str, env: str | None = None) -> Path | None:
        # The pyproject value is checked even where the option or the environment overrides it: a broken
        # pyproject.toml must fail on every machine, not only where no EFFICIENCY_* variable is set.
        configured = _text(merged.get(key), key, sources.get(key, "default"))
        value = opts.get(key.replace("-", "_"))
        if value not in (None, ""):
            return _path(value, cwd)
        if env and os.environ.get(env):
            return _path(os.environ[env], cwd)
        return _path(configured, root)

    ints = {}
    for key in INT_KEYS:
        value, source = pick(key)
        ints[key] = _int(value, key, source)
    context = ints["context"]
    stride = _stride(ints["stride"], pick("stride")[1], context, pick("context")[1])
    window, window_src = pick("min-window")
    dataset_value, dataset_src = pick("dataset")
    dataset = str(_text(dataset_value, "dataset", dataset_src))
    if dataset != "wikitext2":
        dataset = str(_path(dataset, cwd if dataset_src.startswith("--") else root))
    try:
        workload = Workload(
            dataset=dataset,
            context=context,
            stride=stride,
            max_tokens=_max_tokens(*pick("max-tokens")),
            batch_size=_batch_size(*pick("batch-size")),
            prefill_tokens=ints["prefill-tokens"],
            decode_tokens=ints["decode-tokens"],
            min_rounds=ints["rounds"],
            min_window_s=_float(window, "min-window", window_src),
        )
    except ConfigError as err:
        raise ConfigError(f"{err} (from {', '.join(sorted(set(sources.values())))} and the --eff-* options)") \
            from None
    thresholds_table = dict(table.get("thresholds", {}))
    for name, value in dict(device_table.get("thresholds", {})).items():
        _last(thresholds_table, name, value)  # the device's entry takes precedence (parse_thresholds)
    cache_dir = path_pick("cache-dir", "EFFICIENCY_CACHE_DIR") or default_cache_dir()
    threshold_tables = tuple((label, tuple(str(k) for k in names if k != "default")) for label, names in (
        ("[tool.efficiency.thresholds]", dict(table.get("thresholds", {}))),
        (f"[tool.efficiency.{kind}.thresholds]", dict(device_table.get("thresholds", {})))))
    cfg = SuiteConfig(
        models=_names(*keyed("models")),
        techniques=_names(*keyed("techniques")),
        baseline=str(_text(*keyed("baseline"))),
        workload=workload,
        thresholds=replace(parse_thresholds(thresholds_table, list(opts.get("threshold") or [])),
                           tables=threshold_tables),
        device=device,
        model_dir=path_pick("model-dir", "EFFICIENCY_MODEL_DIR"),
        data_dir=path_pick("data-dir", "EFFICIENCY_DATA_DIR"),
        calibration_path=path_pick("calibration"),
        cache_dir=cache_dir,
        report_path=_path(opts.get("report"), cwd),
        reports_dir=path_pick("reports-dir") or root / defaults.REPORTS_DIRNAME,
        random_weights=flag("random-weights"),
        strict=flag("strict"),
        compute_dtype=_compute_dtype(*pick("compute-dtype")),
        technique_options=technique_options(table),
        **quality_settings(pick, path_pick, table, list(opts.get("accuracy_threshold") or [])),
        device_map=opts.get("device_map") or None,
    )
    if check_grid and cfg.device_map and not cfg.device.startswith("cuda"):
        raise ConfigError(f"--eff-device-map {cfg.device_map} splits a model across CUDA GPUs, but this run is on "
                          f"{cfg.device}: drop it, or run on a GPU machine")
    return cfg


def quality_settings(pick: Any, path_pick: Any, table: Mapping[str, Any], cli_thresholds: list[str]) -> dict[str, Any]:
    """``tasks`` / ``kld`` / ``serving`` of the SuiteConfig from ``--eff-tasks`` ... or their pyproject keys."""
    from efficiency.phases.quality_settings import (
        KldSettings,
        ServingSettings,
        TasksSettings,
        parse_thresholds,
    )

    tasks_value, tasks_src = pick("tasks")
    limit, limit_src = pick("task-limit")
    kld_tokens, kld_src = pick("kld-tokens")
    sizes, sizes_src = pick("batch-sizes")
    thresholds = {**{str(k): _pct(v, f"accuracy threshold {k}") for k, v in
                     dict(table.get("accuracy-thresholds", {})).items()}, **parse_thresholds(cli_thresholds)}
    serving: dict[str, Any] = {}
    for key, field_name in (("input-tokens", "input_tokens"), ("output-tokens", "output_tokens")):
        value, source = pick(key)
        if value is not None:
            serving[field_name] = _int(value, key, source)
    return {
        "tasks": TasksSettings(tasks=_names(tasks_value, "tasks", tasks_src) if tasks_value is not None else (),
                               tasks_dir=path_pick("tasks-dir"),
                               limit=_int(limit, "task-limit", limit_src) if limit is not None else None,
                               thresholds=thresholds),
        "kld": KldSettings(**({"tokens": _int(kld_tokens, "kld-tokens", kld_src)} if kld_tokens is not None else {})),
        "serving": ServingSettings(batch_sizes=_int_list(sizes, "batch-sizes", sizes_src) if sizes is not None else (),
                                   **serving),
    }


def validate(opts: Mapping[str, Any], table: Mapping[str, Any], root: Path, cwd: Path | None = None) -> None:
    """Every check that needs no device: the table's keys and both device variants of the values (no torch)."""
    for device in ("cpu", "cuda"):
        build_config(opts, table, root, cwd, device=device)


def canonical_config(cfg: SuiteConfig, cli_thresholds: Sequence[str] = ()) -> SuiteConfig:
    """``cfg`` with every technique name canonical (``techniques.base.parse(name).name``: ``bnb4-nf4`` -> ``bnb4``,
    ``fp32 + bnb4`` -> ``fp32+bnb4``): the baseline, the techniques (one that becomes an earlier one is dropped) and
    the threshold keys (of two spellings of one technique the later in precedence wins: settings.parse_thresholds).
    Done once, before the grid is built, so that the case ids, the ids the session expects, the limits and the
    report agree. An unknown name is an UnknownTechnique (a ConfigError), and so is a ``--eff-threshold NAME=PCT``
    (``cli_thresholds``) whose technique is not in the grid."""
    from efficiency.techniques.base import UnknownTechnique, parse

    def canonical(name: str) -> str | None:
        try:
            return parse(name).name
        except UnknownTechnique:
            return None

    baseline = parse(cfg.baseline).name
    techniques = tuple(dict.fromkeys(parse(name).name for name in cfg.techniques))
    in_grid = tuple(dict.fromkeys((baseline, *techniques)))
    outside = [name for name in cli_threshold_names(list(cli_thresholds))
               if threshold_names_outside((canonical(name) or name,), in_grid)]
    if outside:
        raise ConfigError(f"--eff-threshold for {', '.join(map(repr, outside))}: not a technique of this run's grid "
                          f"({', '.join(in_grid)}) nor a step of one")
    for label, names in cfg.thresholds.tables:  # one table's two spellings: which limit holds is the keys' order
        spelled: dict[str, list[str]] = {}
        for name in names:
            spelled.setdefault(canonical(name) or name, []).append(name)
        twice = {canon: given for canon, given in spelled.items() if len(given) > 1}
        if twice:
            raise ConfigError("; ".join(f"{label} gives {canon} more than one limit, as "
                                        f"{' and '.join(map(repr, given))}: keep one"
                                        for canon, given in twice.items()))
    limits: dict[str, float] = {}
    for name, pct in cfg.thresholds.per_technique.items():  # in order of precedence
        _last(limits, parse(name).name, pct)
    return replace(cfg, baseline=baseline, techniques=techniques,
                   thresholds=Thresholds(cfg.thresholds.default_pct, limits, cfg.thresholds.tables))
