"""Scale-out decisions without a GPU (issue 13): --eff-devices parsing and the worker -> CUDA_VISIBLE_DEVICES
plan, xdist specs, split-model placement, the techniques that cannot run split, and --eff-device-map refused on
the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SHARED_DATA
from efficiency import devices
from efficiency.devices import Assignment, Slot, parse_devices, plan
from efficiency.errors import ConfigError


def test_device_list_and_auto() -> None:
    assert parse_devices("cuda:0, cuda:1") == (Slot("cuda:0", (0,)), Slot("cuda:1", (1,)))
    assert parse_devices("auto", visible_gpus=lambda: 3) == tuple(Slot(f"cuda:{i}", (i,)) for i in range(3))
    assert parse_devices("cuda:0+cuda:1,cuda:2+cuda:3")[1] == Slot("cuda:2+cuda:3", (2, 3))
    assert parse_devices("cpu,cpu") == (Slot("cpu", ()), Slot("cpu", ()))  # CPU workers: nothing shared to refuse


@pytest.mark.parametrize(("value", "message"), [
    ("cuda:0,cuda:0", "share one GPU"),
    ("cuda:0+cuda:1,cuda:1", "share one GPU"),
    ("cpu,cuda:0", "mixes cpu and GPU"),
    ("gpu0", "is not cpu, cuda:N"),
    ("cuda", "is not cpu, cuda:N"),
    (",", "needs 'auto'"),
])
def test_bad_device_lists_are_usage_errors(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_devices(value)


def test_auto_without_a_gpu_says_so() -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        parse_devices("auto", visible_gpus=lambda: 0)


def test_worker_i_gets_entry_i_through_cuda_visible_devices() -> None:
    slots = parse_devices("cuda:0,cuda:1,cuda:2,cuda:3")
    got = plan(slots, 4, environ={})
    assert [(a.worker, a.cuda_visible_devices, a.device) for a in got] == [
        ("gw0", "0", "cuda:0"), ("gw1", "1", "cuda:0"), ("gw2", "2", "cuda:0"), ("gw3", "3", "cuda:0")]
    assert [a.worker for a in plan(slots, 2, environ={})] == ["gw0", "gw1"]  # fewer workers than GPUs is fine


def test_ordinals_are_read_through_the_controllers_own_visible_devices() -> None:
    # The controller sees physical GPUs 5 and 7 as cuda:0 and cuda:1; UUIDs pass through unchanged.
    got = plan(parse_devices("cuda:1,cuda:0"), 2, environ={"CUDA_VISIBLE_DEVICES": "5,7"})
    assert [a.cuda_visible_devices for a in got] == ["7", "5"]
    got = plan(parse_devices("cuda:0+cuda:1"), 1, environ={"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"})
    assert got[0] == Assignment("gw0", "cuda:0+cuda:1", "GPU-aa,GPU-bb", "cuda")
    with pytest.raises(ConfigError, match="cuda:2 does not exist"):
        plan(parse_devices("cuda:2"), 1, environ={"CUDA_VISIBLE_DEVICES": "5,7"})
    assert plan(parse_devices("cpu"), 1, environ={})[0].cuda_visible_devices == ""  # a CPU worker sees no GPU


def test_more_workers_than_devices_is_refused() -> None:
    with pytest.raises(ConfigError, match="two workers would measure on one device"):
        plan(parse_devices("cuda:0,cuda:1"), 3, environ={})
    with pytest.raises(ConfigError, match="give -n N"):
        plan(parse_devices("cuda:0"), 0, environ={})


def test_worker_specs_carry_the_device_and_dist_becomes_loadgroup() -> None:
    assignments = plan(parse_devices("cuda:0,cuda:1"), 2, environ={"CUDA_VISIBLE_DEVICES": "2,3"})
    tx = devices.pinned_tx(["popen", "popen"], assignments)
    assert tx == ["popen//env:CUDA_VISIBLE_DEVICES=2", "popen//env:CUDA_VISIBLE_DEVICES=3"]
    import execnet

    assert execnet.XSpec(tx[1]).env == {"CUDA_VISIBLE_DEVICES": "3"}  # what execnet sets in the new process
    with pytest.raises(ConfigError, match="sets CUDA_VISIBLE_DEVICES itself"):
        devices.pinned_tx(["popen//env:CUDA_VISIBLE_DEVICES=1", "popen"], assignments)
    assert devices.assignment_for_env(assignments, "3") == assignments[1]  # a restarted worker: same spec
    assert devices.assignment_for_env(assignments, None) is None
    assert devices.required_dist("load") == devices.required_dist("loadgroup") == "loadgroup"
    with pytest.raises(ConfigError, match="needs --dist loadgroup"):
        devices.required_dist("each")


def test_placement_of_a_split_model() -> None:
    hf_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": "cuda:1"}
    assert devices.placement_gpus(hf_map) == (0, 1)
    assert devices.offloaded_modules({**hf_map, "model.layers.2": "cpu", "model.norm": "disk"}) == [
        "model.layers.2", "model.norm"]
    assert devices.model_gpus(object()) == ()  # not dispatched: not split


def test_techniques_that_cannot_run_split_say_why() -> None:
    assert devices.split_unsupported(["fp16"]) is None
    assert devices.split_unsupported(["bf16", "fp32"]) is None
    bnb = devices.split_unsupported(["fp16", "bnb4"])
    assert bnb is not None and bnb.startswith("bnb4:") and "bitsandbytes" in bnb
    for step, word in (("ah90", "head pruning"), ("minitron-w25", "Minitron"), ("sparsegpt50", "SparseGPT"),
                       ("distil", "distillation"), ("mag-2:4", "magnitude"), ("int8wo", "not verified")):
        reason = devices.split_unsupported([step])
        assert reason is not None and word in reason and "--eff-device-map" in reason


def test_device_map_arguments_leave_headroom_and_never_offload() -> None:
    from efficiency.models import device_map_kwargs, placement_summary

    kwargs = device_map_kwargs("balanced", {0: 80 * 2**30, 1: 40 * 2**30})
    assert kwargs["device_map"] == "balanced"
    assert kwargs["max_memory"] == {0: int(80 * 2**30 * 0.9), 1: int(40 * 2**30 * 0.9)}
    assert "cpu" not in kwargs["max_memory"]
    summary = placement_summary("balanced", kwargs, {"model.layers.0": 0, "model.layers.1": 1, "lm_head": 1})
    assert summary["gpus"] == ["cuda:0", "cuda:1"]
    assert summary["modules_by_device"] == {"cuda:0": 1, "cuda:1": 2}
    assert set(summary["max_memory_bytes"]) == {"cuda:0", "cuda:1"}
    with pytest.raises(ConfigError, match="use one of auto, balanced"):
        device_map_kwargs("sequential", {0: 1})
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        device_map_kwargs("auto", {})


def test_device_map_on_a_cpu_run_is_a_usage_error(tmp_path: Path) -> None:
    from efficiency.models import ModelSource, SourceKind, load
    from efficiency.settings import build_config

    with pytest.raises(ConfigError, match="--eff-device-map auto splits a model across CUDA GPUs, but this run is on"):
        build_config({"device": "cpu", "device_map": "auto"}, {}, tmp_path)
    with pytest.raises(ConfigError, match="use one of auto, balanced"):
        build_config({"device_map": "everywhere"}, {}, tmp_path, device="cuda")
    assert build_config({"device_map": "balanced"}, {}, tmp_path, device="cuda").device_map == "balanced"
    import torch

    with pytest.raises(ConfigError, match="this run is on cpu"):  # library users calling load() directly
        load(ModelSource("x", SourceKind.RANDOM_CONFIG, str(tmp_path)), "cpu", torch.float32, tmp_path,
             device_map="auto")


def test_random_weights_load_through_the_device_map_path() -> None:
    """The split path builds random weights with from_pretrained(None, state_dict={}) under a device map; here
    the map is the CPU (accelerate's own placement logic is what a GPU run adds): weights initialised, tied,
    seeded and finite."""
    import torch
    from transformers import GPT2Config

    from efficiency.models import _random_model

    cfg = GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=2, vocab_size=100)
    split = {"device_map": "auto", "max_memory": {"cpu": 2**30}}
    a = _random_model(cfg, torch.float32, "cpu", split)
    b = _random_model(cfg, torch.float32, "cpu", split)
    w = a.transformer.h[0].mlp.c_fc.weight.detach()
    assert 0.01 < float(w.std()) < 0.05  # GPT-2's initializer_range 0.02, not zeros and not empty memory
    assert torch.equal(w, b.transformer.h[0].mlp.c_fc.weight)  # seeded
    assert a.lm_head.weight.data_ptr() == a.transformer.wte.weight.data_ptr()  # tied
    assert bool(a(torch.tensor([[1, 2, 3]])).logits.isfinite().all())


def test_runner_skips_a_technique_that_cannot_run_split(tmp_path: Path) -> None:
    from efficiency.config import SuiteConfig, Thresholds, Workload
    from efficiency.runner import Runner
    from efficiency.techniques.base import UnsupportedTechnique

    cfg = SuiteConfig(models=("gpt2",), techniques=("ah90",), baseline="fp32", workload=Workload(),
                      thresholds=Thresholds(), device="cpu", device_map=None, cache_dir=tmp_path,
                      model_dir=SHARED_DATA / "architectures", random_weights=True)
    if not (SHARED_DATA / "architectures" / "gpt2").is_dir():
        pytest.skip("no GPT-2 config folder")
    runner = Runner(SuiteConfig(**{**cfg.__dict__, "device_map": "auto"}), log=lambda m: None)
    with pytest.raises(UnsupportedTechnique, match="ah90: cannot run on a model split across GPUs"):
        runner.measure("gpt2", "ah90")


def test_case_placement_names_the_worker_and_its_gpus() -> None:
    from efficiency.measure.meters import GpuMapping, MeterSet
    from efficiency.measure.sample import NullMeter

    null = NullMeter("none")
    ms = MeterSet("cuda:0", null, null, null, gpu_mappings=(GpuMapping(0, 3, "00000000:af:00.0", "pci-bus-id"),))
    env = {"PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": "4", "CUDA_VISIBLE_DEVICES": "3"}
    got = devices.placement(ms, env)
    assert got["worker"] == "gw1" and got["workers"] == 4 and got["cuda_visible_devices"] == "3"
    assert got["gpus"][0]["nvml_index"] == 3 and ms.nvml_indices == (3,)


def test_placement_of_a_model_without_hf_device_map_comes_from_its_parameters() -> None:
    """On the H100 (transformers 5.17) a model that fitted on one GPU came back without hf_device_map and the
    report's placement said no GPU at all."""
    import torch

    from efficiency.devices import placement_gpus
    from efficiency.models import device_map_of

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert device_map_of(model) == {"": "cpu"}
    model.hf_device_map = {"0": 0, "1": 1}  # type: ignore[assignment]
    assert device_map_of(model) == {"0": 0, "1": 1} and placement_gpus(device_map_of(model)) == (0, 1)
    assert placement_gpus({"": "cuda:0"}) == (0,)
