"""--eff-devices through pytester with pytest-xdist (issue 13), without a GPU: the environment each worker
process got (cuda entries, checked by a plain test that never touches CUDA), a CPU grid on `cpu` workers merged
into one report with the plan and each case's placement, and the usage errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_plugin import run_grid, tiny_dir  # noqa: F401  (tiny_dir is a fixture)

ENV_TEST = """
import json, os

def test_env(request, tmp_path_factory):
    wid = os.environ["PYTEST_XDIST_WORKER"]
    out = {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
           "planned": request.config.workerinput.get("efficiency_devices")}
    (tmp_path_factory.getbasetemp().parent / f"{wid}.json").write_text(json.dumps(out))
"""


def test_each_worker_process_gets_its_gpu_in_cuda_visible_devices(pytester: pytest.Pytester,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers on cuda:1 and cuda:0 of a controller that sees physical GPUs 5 and 7: gw0 gets 7, gw1 gets 5,
    set in the worker process itself (no CUDA needed: the test reads its environment)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    pytester.makepyfile(test_env=ENV_TEST.replace("def test_env", "def test_env_a"))
    pytester.makepyfile(test_env2=ENV_TEST.replace("def test_env", "def test_env_b"))
    base = pytester.path / "bt"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--eff-devices", "cuda:1,cuda:0",
                                           "--basetemp", str(base))
    result.assert_outcomes(passed=2)
    envs = {p.stem: json.loads(p.read_text()) for p in base.rglob("gw*.json")}
    assert envs and set(envs) <= {"gw0", "gw1"}
    assert {w: e["visible"] for w, e in envs.items()} == {w: v for w, v in (("gw0", "7"), ("gw1", "5")) if w in envs}
    for wid, env in envs.items():
        assert env["planned"]["worker"] == wid and env["planned"]["device"] == "cuda:0"


def test_cpu_workers_measure_a_grid_into_one_report(pytester: pytest.Pytester, tiny_dir: Path) -> None:  # noqa: F811
    models = tiny_dir / "models"
    if not (models / "tiny-gpt2-b").exists():
        shutil.copytree(models / "tiny-gpt2", models / "tiny-gpt2-b")
    result, report = run_grid(pytester, tiny_dir, "--eff-models", "tiny-gpt2,tiny-gpt2-b", "--eff-techniques",
                              "fp32,bf16", "-n", "2", "--eff-devices", "cpu,cpu", "--eff-history", "off")
    result.assert_outcomes(passed=4)
    assert report["status"] == "complete"
    env = report["environment"]
    assert [w["worker"] for w in env["devices"]["workers"]] == ["gw0", "gw1"]
    assert all(w["cuda_visible_devices"] == "" and w["device"] == "cpu" for w in env["devices"]["workers"])
    assert env["devices"]["dist"] == "loadgroup"
    assert "shared by 2 concurrent pytest-xdist workers" in env["devices"]["cpu_energy"]
    assert env["idle_power"]["power_w"] is None and "controller" in env["idle_power"]["reason"]
    by_model: dict[str, set[str]] = {}
    for case in report["cases"]:
        placement = case["conditions"]["placement"]
        assert placement["cuda_visible_devices"] == "" and placement["workers"] == 2  # set in the worker process
        by_model.setdefault(case["model"], set()).add(placement["worker"])
        cpu = case["energy"]["cpu"]
        assert cpu["energy_j"] is None and cpu["reason"]  # shared (RAPL) or absent here: never attributed
    assert all(len(workers) == 1 for workers in by_model.values())  # one model's cases on one worker


@pytest.mark.parametrize(("args", "message"), [
    (["-n", "3", "--eff-devices", "cpu,cpu"], "*two workers would measure on one device*"),
    (["-n", "2", "--eff-devices", "cuda:0,cuda:0"], "*would share one GPU*"),
    (["--eff-devices", "cpu"], "*give -n N*"),
    (["-n", "1", "--dist", "each", "--eff-devices", "cpu"], "*needs --dist loadgroup*"),
    (["-n", "1", "--eff-devices", "cpu", "--eff-device", "cpu"], "*exclude each other*"),
    (["-n", "1", "--eff-devices", "cuda:0+cuda:1"], "*add --eff-device-map*"),
])
def test_device_plan_mistakes_are_usage_errors(pytester: pytest.Pytester, args: list[str], message: str) -> None:
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_device_map_on_a_cpu_run_is_a_usage_error(pytester: pytest.Pytester, tiny_dir: Path) -> None:  # noqa: F811
    result, _ = run_grid(pytester, tiny_dir, "--eff-device", "cpu", "--eff-device-map", "auto")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--eff-device-map auto splits a model across CUDA GPUs*"])
