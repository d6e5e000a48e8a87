"""--eff-grid from a normal (non-editable) install: the package lives inside a virtual environment, which pytest
never collects from; the grid must be collected all the same. Found by following the README in a scratch
repository: `pytest --eff-grid -m efficiency` collected nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import efficiency


def test_the_grid_is_collected_from_a_package_inside_a_virtualenv(pytester: pytest.Pytester,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    venv = pytester.path / ".venv"
    site = venv / "lib" / "python3" / "site-packages"
    shutil.copytree(Path(efficiency.__file__).parent, site / "efficiency",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")  # what pytest recognises as a virtualenv
    pytester.makepyfile(test_other="def test_other():\n    pass\n")
    pytester.makepyprojecttoml('[tool.efficiency]\nmodels = ["smollm2-135m"]\n')
    monkeypatch.setenv("PYTHONPATH", str(site))  # the plugin imports from the copy inside the venv
    result = pytester.runpytest_subprocess("-p", "no:efficiency", "-p", "efficiency.plugin", "--eff-grid", "--co",
                                           "-q", "-p", "no:cacheprovider", "--eff-device", "cpu",
                                           "--eff-techniques", "fp32,bnb4")
    result.stdout.fnmatch_lines(["*grid.py::test_efficiency?smollm2-135m-fp32?*",
                                 "*grid.py::test_efficiency?smollm2-135m-bnb4?*"])
