"""On-disk cache for expensive steps (calibration statistics, pruned weights, trained students).

An entry is a folder ``<cache_dir>/<kind>/<key>`` where ``key`` hashes everything the result depends on.
Entries are built in a temporary folder and renamed into place, so an interrupted build leaves no entry
(only a ``*.tmp-*`` folder that the next build of the same key removes).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def cache_key(parts: Mapping[str, Any]) -> str:
    """A stable hash of JSON-serialisable ``parts`` (keys sorted; non-JSON values by ``str``)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def entry_dir(cache_dir: Path, kind: str, parts: Mapping[str, Any]) -> Path:
    return cache_dir / kind / cache_key(parts)


def cached_build(
    cache_dir: Path, kind: str, parts: Mapping[str, Any], build: Callable[[Path], None]
) -> tuple[Path, bool]:
    """Return (entry folder, hit). On a miss, ``build(tmp)`` fills a temporary folder that is then renamed."""
    final = entry_dir(cache_dir, kind, parts)
    if (final / "meta.json").is_file():
        return final, True
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f"{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{final.name}.tmp-"))
    try:
        build(tmp)
        (tmp / "meta.json").write_text(json.dumps(dict(parts), sort_keys=True, default=str, indent=1))
        if final.exists():  # a concurrent builder won; keep its entry
            shutil.rmtree(tmp)
        else:
            tmp.replace(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, False
