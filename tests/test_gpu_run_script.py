"""benchmarks/gpu/run.sh passes a TERM it receives (``timeout``, a CI cancel) on to the pytest it runs, so that
the suite marks its report 'interrupted' (tests/test_plugin.py checks that part). Before, the shell died alone and
two reports of the H200 leases stayed 'running' (docs/results.md sections 5d and 5e).

The pytest here is a stand-in given as ``PYTHON``: it records its arguments and the TERM it gets, nothing else,
because what is under test is the script's signal handling and the pytest command it builds, not a measurement
(a ``-c`` snippet, the script asking which plugin option to pass, goes to the real interpreter)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAND_IN = '''#!{python}
import os, pathlib, signal, sys, time
if sys.argv[1] == "-c":
    os.execv({python!r}, [{python!r}, *sys.argv[1:]])
out = pathlib.Path({out!r})
def term(signum, frame):
    (out / "terminated").write_text("TERM")
    sys.exit(2)
signal.signal(signal.SIGTERM, term)
(out / "argv").write_text(" ".join(sys.argv[1:]))
(out / "started").write_text(str(__import__("os").getpid()))
time.sleep(60)
'''


@pytest.mark.skipif(sys.platform == "win32", reason="bash and POSIX signals")
def test_a_term_to_the_script_reaches_the_suite(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text(STAND_IN.format(python=sys.executable, out=str(tmp_path)))
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "EFFICIENCY_DATA_DIR": str(tmp_path)}
    script = subprocess.Popen(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "probe", str(tmp_path / "out")],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "started").exists():
            assert time.monotonic() < deadline and script.poll() is None, "the stand-in suite never started"
            time.sleep(0.05)
        argv = (tmp_path / "argv").read_text()
        assert "-m pytest benchmarks/test_grid.py" in argv
        # Where the package is installed its entry point loads the plugin, and `-p efficiency.plugin` as well made
        # pytest stop at once ("Plugin already registered under a different name"): run.sh failed on every host
        # installed as the README says, and ran only in the leases' bare checkouts.
        installed = any(e.value == "efficiency.plugin" for e in metadata.entry_points(group="pytest11"))
        assert ("-p efficiency.plugin" in argv) is not installed, argv
        script.send_signal(signal.SIGTERM)
        assert script.wait(timeout=30) == 143
        assert (tmp_path / "terminated").read_text() == "TERM"
    finally:
        if script.poll() is None:
            script.kill()
        started = tmp_path / "started"
        if started.exists() and not (tmp_path / "terminated").exists():
            try:
                os.kill(int(started.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
