"""Every module under efficiency/ imports on its own: an import cycle (energy <-> nvml once) shows only when
the cycle's other module is imported first, so each module is imported first in turn.

One subprocess imports them one after the other, purging every ``efficiency`` module from ``sys.modules``
before each, so each import starts from no suite module loaded (third-party modules stay, which is what keeps
this fast; cycles inside the suite are what this guards against)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import efficiency

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(efficiency.__path__, "efficiency."))

_SCRIPT = """
import importlib, json, sys, traceback
failures = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "efficiency" or m.startswith("efficiency.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
"""


@pytest.fixture(scope="module")
def failures() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, *MODULES], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=600)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_modules_were_found() -> None:
    assert "efficiency.measure.nvml" in MODULES and "efficiency.techniques.base" in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_on_its_own(module: str, failures: dict[str, str]) -> None:
    assert module not in failures, failures[module]


def test_a_cycle_would_be_caught(tmp_path: Path) -> None:
    """The purge loop finds a cycle that a single shared import would hide."""
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("X = 1\nfrom cyc.b import Y\n")
    (pkg / "b.py").write_text("from cyc.a import X\nY = 2\n")
    script = _SCRIPT.replace('"efficiency"', '"cyc"').replace('"efficiency."', '"cyc."')
    out = subprocess.run([sys.executable, "-c", script, "cyc.a", "cyc.b"], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert list(found) == ["cyc.b"]
