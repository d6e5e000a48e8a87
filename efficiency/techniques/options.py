"""Per-technique options: set any dataclass field of a technique's config from pyproject.

``[tool.efficiency.technique."minitron-w25"] tokens = 50000`` sets ``tokens``, a field of the technique's
nested settings dataclass. A key is looked up among the technique's own fields first, then among the fields
of its nested dataclasses (``settings.tokens`` names one explicitly). Values are type-checked against the
field's annotation; a mapping field is merged over its default (so ``students = {"opt-1.3b": "..."}`` keeps
``gpt2 -> distilgpt2``). A key that would change the technique's name (``kl = "reverse"`` on ``distil-d50``)
is refused: write it in the name instead (``distil-d50-rkl``). Every mistake is a ConfigError naming the key
and the valid ones.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from efficiency.errors import ConfigError


def canonical_options(options: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Options keyed by canonical step name (``bnb4-nf4`` -> ``bnb4``); two tables for one name are merged."""
    from efficiency.techniques.base import parse_one, split

    out: dict[str, dict[str, Any]] = {}
    for key, values in options.items():
        parts = split(key)
        if len(parts) != 1:
            raise ConfigError(f"technique options {key!r}: options apply to one technique, not a pipeline; "
                              f"give each step its own table ({', '.join(repr(p) for p in parts)})")
        if not isinstance(values, Mapping):
            raise ConfigError(f"technique options {key!r} must be a table of field = value, got {values!r}")
        out.setdefault(parse_one(parts[0]).name, {}).update(values)
    return out


def recorded_options(options: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The options as a report records them: keyed by canonical step name, the names a case's ``steps`` list, so
    that a comparison can take the options of each case's own steps; values as JSON. An empty table imports no
    technique; one that names no technique (refused before any case runs) is recorded as given."""
    from efficiency.results import jsonable

    try:
        by_step = canonical_options(options) if options else {}
    except ConfigError:
        return {str(name): jsonable(values) for name, values in options.items()}
    return {name: jsonable(values) for name, values in by_step.items()}


def settable_fields(technique: Any) -> dict[str, str]:
    """Option key -> dotted field path, for every field a user may set on ``technique``."""
    out: dict[str, str] = {}
    nested: dict[str, str] = {}
    for f in dataclasses.fields(technique):
        if not f.init:
            continue
        out[f.name] = f.name
        value = getattr(technique, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for sub in dataclasses.fields(value):
                if sub.init:
                    nested.setdefault(sub.name, f"{f.name}.{sub.name}")
                    out[f"{f.name}.{sub.name}"] = f"{f.name}.{sub.name}"
    for key, path in nested.items():
        out.setdefault(key, path)
    return out


def apply_options(technique: Any, values: Mapping[str, Any]) -> Any:
    """``technique`` with ``values`` set (a new frozen dataclass); ConfigError on any unknown key, wrong type,
    invalid value or name change."""
    name = str(getattr(technique, "name", technique))
    if not dataclasses.is_dataclass(technique) or isinstance(technique, type):
        raise ConfigError(f"technique {name!r} takes no options (it is not a dataclass config)")
    fields = settable_fields(technique)
    unknown = sorted(k for k in values if k not in fields)
    if unknown:
        raise ConfigError(f"technique {name!r}: unknown option(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(sorted(fields))}")
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        outer, _, inner = fields[key].partition(".")
        if inner:
            nested.setdefault(outer, {})[inner] = value
        else:
            top[outer] = value
    try:
        changes: dict[str, Any] = {}
        for key, value in top.items():
            changes[key] = _checked(technique, key, value, name)
        for outer, sub_values in nested.items():
            base = changes.get(outer, getattr(technique, outer))
            subs = {k: _checked(base, k, v, f"{name}: {outer}") for k, v in sub_values.items()}
            changes[outer] = dataclasses.replace(base, **subs)
        new: Any = dataclasses.replace(technique, **changes)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"technique {name!r}: invalid options {dict(values)}: {err}") from err
    if new.name != name:
        raise ConfigError(f"technique {name!r}: options {dict(values)} would rename it to "
                          f"{new.name!r}; write that name in the technique list instead")
    return new


def _checked(obj: Any, key: str, value: Any, where: str) -> Any:
    try:
        hint = typing.get_type_hints(type(obj)).get(key, Any)
    except Exception:  # an annotation naming a type-checking-only import: check by the default's type
        default_value = getattr(obj, key)
        hint = Any if default_value is None else type(default_value)
    if not _matches(value, hint):
        raise ConfigError(f"technique {where}: option {key!r} must be {_describe(hint)}, got {value!r} "
                          f"({type(value).__name__})")
    default = getattr(obj, key)
    if isinstance(default, Mapping) and isinstance(value, Mapping):
        return {**default, **value}
    if isinstance(value, int) and not isinstance(value, bool) and _accepts_float_only(hint):
        return float(value)
    return value


def _accepts_float_only(hint: Any) -> bool:
    args = typing.get_args(hint) if _is_union(hint) else (hint,)
    return float in args and int not in args


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if _is_union(hint):
        return any(_matches(value, h) for h in typing.get_args(hint))
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            return False
        args = typing.get_args(hint)
        return not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if origin in (tuple, list):
        return isinstance(value, (list, tuple))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
