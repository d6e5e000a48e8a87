"""On-disk cache for expensive steps (calibration statistics, pruned weights, trained students).

An entry is a folder ``<cache_dir>/<kind>/<key>`` where ``key`` hashes everything the result depends on.
Entries are built in a temporary folder named after the building process (``<key>.tmp-<pid>-<random>``) and
renamed into place, so an interrupted build leaves no entry, only a temporary folder that a later build of the
same key removes once its process is gone. Builders running at the same time (concurrent runs, pytest-xdist
workers) never touch each other's folders; the first finished build wins. ``meta.json`` lists the size of every
file the build wrote; an entry whose files no longer have those sizes (truncated or deleted by hand, a full disk
while copying a cache) is not served: it is removed and built again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from efficiency.files import give_usual_mode


def cache_key(parts: Mapping[str, Any]) -> str:
    """A stable hash of JSON-serialisable ``parts`` (keys sorted; non-JSON values by ``str``)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def entry_dir(cache_dir: Path, kind: str, parts: Mapping[str, Any]) -> Path:
    return cache_dir / kind / cache_key(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours (EPERM)
        return True
    return True


def _stale(tmp: Path, key: str) -> bool:
    """A temporary folder of a build whose process is gone (or of the old unnamed layout)."""
    pid = tmp.name.removeprefix(f"{key}.tmp-").split("-", 1)[0]
    return not pid.isdigit() or not _pid_alive(int(pid))


MANIFEST_KEY = "files"  # in meta.json: path relative to the entry -> size in bytes, as built


def _manifest(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name != "meta.json"}


def damaged(entry: Path) -> str | None:
    """Why a finished entry cannot be served (its files differ from the sizes it was built with), else None.
    Entries from before the manifest carry none and are trusted as before."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError) as err:
        return f"unreadable meta.json ({type(err).__name__}: {err})"
    expected = meta.get(MANIFEST_KEY) if isinstance(meta, dict) else None
    if not isinstance(expected, dict):
        return None
    found = _manifest(entry)
    bad = sorted(name for name in set(expected) | set(found) if expected.get(name) != found.get(name))
    if not bad:
        return None
    return "files changed since the build: " + ", ".join(
        f"{name} ({found.get(name, 'missing')} bytes, built {expected.get(name, 'absent')})" for name in bad[:3])


def cached_build(
    cache_dir: Path, kind: str, parts: Mapping[str, Any], build: Callable[[Path], None]
) -> tuple[Path, bool]:
    """Return (entry folder, hit). On a miss, ``build(tmp)`` fills a temporary folder that is then renamed. A damaged
    entry (:func:`damaged`) is removed and counts as a miss."""
    final = entry_dir(cache_dir, kind, parts)
    if (final / "meta.json").is_file():
        if damaged(final) is None:
            return final, True
        shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    for old in final.parent.glob(f"{final.name}.tmp-*"):
        if _stale(old, final.name):
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{final.name}.tmp-{os.getpid()}-"))
    try:
        build(tmp)
        meta = {**dict(parts), MANIFEST_KEY: _manifest(tmp)}
        (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True, default=str, indent=1))
        give_usual_mode(tmp, final)  # mkdtemp's 0o700 would hide the entry from others sharing the cache
        try:
            tmp.replace(final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
            shutil.rmtree(tmp)  # a concurrent builder won; keep its entry
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, False
