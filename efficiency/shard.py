"""A grid sharded across machines (CI matrix jobs) and merged back into one report.

- :func:`shard` picks a deterministic 1/N of the grid for ``--eff-shard I/N`` (I from 1 to N): a model's cases
  stay together (its baseline is measured once, in its shard, and its deltas need it), and models are spread
  so that the shards hold about the same number of cases (largest model first, each to the shard with the
  fewest cases so far; ties to the lowest shard). Every machine computes the same split from the same grid.
- :func:`merge` combines the shard reports of one commit into one report that ``efficiency report``,
  ``compare``, ``gate`` and the history accept. It refuses reports whose commit, settings (the shard itself
  aside), machine or software differ, with the reason, and a case reported by two shards. The merged report is
  ``complete`` only when every shard is complete and, where the shards recorded ``settings.shard``, all N of
  them are there.

Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from efficiency.report.compare import machine_of
from efficiency.report.schema import SCHEMA_VERSION, upgrade

Report = dict[str, Any]
_WORST_FIRST = ("failed", "interrupted", "running", "incomplete", "complete")


class MergeError(ValueError):
    """Shard reports that cannot be one run; the message names the file and the difference."""


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 1 <= I <= N; ValueError otherwise (a usage error)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--eff-shard {text!r}: expected I/N, for example 2/4") from None
    if not 1 <= i <= n:
        raise ValueError(f"--eff-shard {text!r}: I must be between 1 and N")
    return i, n


def assignment(case_ids_by_model: Mapping[str, Sequence[str]], count: int) -> dict[str, int]:
    """model -> its shard (1..count), balanced by case count, deterministic."""
    if count < 1:
        raise ValueError("the shard count must be >= 1")
    load = [0] * count
    out: dict[str, int] = {}
    for model in sorted(case_ids_by_model, key=lambda m: (-len(case_ids_by_model[m]), m)):
        target = min(range(count), key=lambda k: (load[k], k))
        out[model] = target + 1
        load[target] += len(case_ids_by_model[model])
    return out


def shard(case_ids_by_model: Mapping[str, Sequence[str]], index: int, count: int) -> list[str]:
    """The case ids of shard ``index`` of ``count`` (1-based), in the grid's order."""
    if not 1 <= index <= count:
        raise ValueError(f"shard {index} of {count}: the index must be between 1 and {count}")
    owner = assignment(case_ids_by_model, count)
    return [cid for model, cids in case_ids_by_model.items() if owner[model] == index for cid in cids]


def _identity(report: Report) -> dict[str, Any]:
    """What must be equal for shard reports to be parts of one run."""
    env = report.get("environment") or {}
    git = env.get("git") or {}
    settings = {k: v for k, v in (report.get("settings") or {}).items() if k != "shard"}
    return {"commit": git.get("commit"), "dirty": git.get("dirty"), "settings": settings,
            "machine": machine_of(report), "python": env.get("python"), "packages": env.get("packages"),
            "schema_version": report.get("schema_version")}


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in dict.fromkeys([*a, *b]) for d in _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def _order(report: Report) -> Any:
    settings = report.get("settings") or {}
    models, techniques = list(settings.get("models") or []), list(settings.get("techniques") or [])

    def key(case: Mapping[str, Any]) -> tuple[int, int]:
        m, t = case.get("model"), case.get("technique")
        return (models.index(m) if m in models else len(models),
                techniques.index(t) if t in techniques else len(techniques))
    return key


def merge(reports: Sequence[Report], sources: Sequence[str] | None = None) -> Report:
    """One report from the shard reports of one run (see the module docstring)."""
    if not reports:
        raise MergeError("nothing to merge")
    names = list(sources or [f"report {i + 1}" for i in range(len(reports))])
    runs = [upgrade(r, name) for r, name in zip(reports, names, strict=True)]
    first = _identity(runs[0])
    if not first["commit"]:
        raise MergeError(f"{names[0]} has no git commit: shard reports are merged only when they measured one "
                         "commit")
    for run, name in zip(runs[1:], names[1:], strict=True):
        diff = _diff(first, _identity(run))
        if diff:
            raise MergeError(f"{name} is not a shard of the same run as {names[0]}: " + "; ".join(diff[:5])
                             + ("; ..." if len(diff) > 5 else ""))
    seen: dict[str, str] = {}
    cases: list[dict[str, Any]] = []
    for run, name in zip(runs, names, strict=True):
        for case in run.get("cases") or []:
            if case["id"] in seen:
                raise MergeError(f"case {case['id']} is in both {seen[case['id']]} and {name}: a case is measured "
                                 "by one shard only")
            seen[case["id"]] = name
            cases.append(case)
    status = min((str(r.get("status")) for r in runs),
                 key=lambda s: _WORST_FIRST.index(s) if s in _WORST_FIRST else 0)
    notes: list[str] = []
    lost_shards: list[int] = []
    shards = [(r.get("settings") or {}).get("shard") for r in runs]
    if all(isinstance(s, dict) for s in shards):
        counts = {s["count"] for s in shards if isinstance(s, dict)}
        present = {s["index"] for s in shards if isinstance(s, dict)}
        lost_shards = sorted(set(range(1, max(counts) + 1)) - present) if len(counts) == 1 else []
        if len(counts) != 1:
            raise MergeError(f"the shard reports split the grid differently: counts {sorted(counts)}")
        if lost_shards:
            notes.append(f"shard(s) {', '.join(map(str, lost_shards))} of {max(counts)} missing: not every case of "
                         "the grid is here")
            status = "incomplete" if status == "complete" else status
    merged: Report = {**runs[0], "schema_version": SCHEMA_VERSION, "status": status}
    merged["settings"] = {k: v for k, v in (runs[0].get("settings") or {}).items() if k != "shard"}
    starts = [s for r in runs if (s := r.get("started_at"))]
    ends = [e for r in runs if (e := r.get("finished_at"))]
    merged["started_at"] = min(starts) if starts else None
    merged["finished_at"] = max(ends) if len(ends) == len(runs) else None
    merged["cases"] = sorted(cases, key=_order(runs[0]))
    merged["violations"] = [v for r in runs for v in r.get("violations") or []]
    merged.pop("missing", None)
    missing = sorted({m for r in runs for m in r.get("missing") or []})
    if missing:
        merged["missing"] = missing
    merged.pop("selected", None)
    if not lost_shards and all(isinstance(r.get("selected"), list) for r in runs):  # a lost one's is unknown
        merged["selected"] = sorted({c for r in runs for c in r["selected"]})
    merged["merged_from"] = [{"source": name, "shard": (r.get("settings") or {}).get("shard"),
                              "status": r.get("status"), "started_at": r.get("started_at"),
                              "finished_at": r.get("finished_at"),
                              "hostname": (r.get("environment") or {}).get("hostname"),
                              "cases": [c["id"] for c in r.get("cases") or []]}
                             for r, name in zip(runs, names, strict=True)]
    if notes:
        merged["merge_notes"] = notes
    return merged
