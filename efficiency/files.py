"""The permissions of what the suite publishes by renaming a temporary file or folder into place.

``tempfile.mkstemp`` and ``mkdtemp`` create 0o600 files and 0o700 folders; renamed into place as they are, a
report, a token cache or a cached technique result was readable by its owner alone (an artifact uploader, a web
server or a teammate sharing ``--eff-cache-dir`` could not read it), unlike what a plain ``open`` or ``mkdir``
leaves.
"""

from __future__ import annotations

import os
from pathlib import Path


def usual_mode(target: Path, is_dir: bool) -> int:
    """The mode a plain ``open(target, "w")`` (``mkdir`` for a folder) would leave: the target's own where it
    exists, else 0o666 (0o777) less the process's umask."""
    if target.exists():
        return target.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def give_usual_mode(tmp: Path, target: Path) -> None:
    """Give ``tmp``, about to replace ``target``, :func:`usual_mode`."""
    os.chmod(tmp, usual_mode(target, tmp.is_dir()))
