"""Shared fixtures: tiny random models of each family (GPT-2, OPT, Llama) and the offline data folder."""

from __future__ import annotations

import os
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EFFICIENCY_DATA_DIR", REPO.parent / "shared" / "data"))


def tiny_config(family: str) -> Any:
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    if family == "gpt2":
        return GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    if family == "opt":
        return OPTConfig(
            vocab_size=128, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
        )
    if family == "llama":
        return LlamaConfig(
            vocab_size=128, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        )
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family)).eval()


@pytest.fixture(params=["gpt2", "opt", "llama"])
def tiny(request: pytest.FixtureRequest) -> Any:
    return tiny_model(request.param)


@pytest.fixture
def one_thread() -> Any:
    """The machine is shared: tiny matmuls run faster on one thread than on oversubscribed ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip(f"offline data folder not found at {SHARED_DATA} (set EFFICIENCY_DATA_DIR)")
    return SHARED_DATA


def shared_cache_dir() -> Path:
    """The cache the slow tests share (the dequantised SmolLM2 is built once there): $EFFICIENCY_CACHE_DIR, which
    .ci/run sets, else the repository's .eff-cache."""
    return Path(os.environ.get("EFFICIENCY_CACHE_DIR") or REPO / ".eff-cache")


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The real SmolLM2-135M as an HF folder (dequantised from its Q4_1 GGUF); skips where it cannot be had."""
    from efficiency.smollm2 import ensure_dequantised

    try:
        return ensure_dequantised(shared_cache_dir())
    except Exception as err:  # offline without the cached wheel
        pytest.skip(f"SmolLM2-135M is not available: {type(err).__name__}: {err}")


@pytest.fixture(scope="session")
def smollm2_eval_ids(smollm2_folder: Path, shared_data: Path) -> Any:
    """768 SmolLM2 tokens of the WikiText-2 test split (its first 20,000 characters): the slow tests' small budget."""
    import torch
    from transformers import AutoTokenizer

    text = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text()[:20000]
    return torch.tensor(AutoTokenizer.from_pretrained(smollm2_folder)(text)["input_ids"][:768])


class ByteTokenizer:
    """Enough of a tokenizer for ``efficiency.data.tokenize``: bytes folded into the tiny models' 128 ids."""

    bos_token_id = None
    special_tokens_map: dict[str, str] = {}

    def __len__(self) -> int:
        return 128

    def __call__(self, text: str, return_tensors: str | None = None, add_special_tokens: bool = True) -> Any:
        import torch

        ids = [b % 128 for b in text.encode()]
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)


def byte_context(tmp_path: Path) -> Any:
    """A CPU Context whose calibration text is 600 random words, tokenised by :class:`ByteTokenizer`."""
    from efficiency.data import Corpus
    from efficiency.techniques.base import Context

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran"]
    text = " ".join(rng.choice(words) for _ in range(600))
    corpus = Corpus("calib.txt", "test", text)
    return Context("cpu", ByteTokenizer(), "tiny", tmp_path, calibration=lambda: corpus, progress=False)


class CharTokenizer:
    """Enough of a tokenizer for efficiency.data.tokenize: one id per character, vocabulary 128, BOS = 1."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, None
    special_tokens_map = {"bos_token": "<s>"}

    def __len__(self) -> int:
        return 128

    def __call__(self, text: str, return_tensors: str | None = None, add_special_tokens: bool = True) -> Any:
        import torch

        ids = ([1] if add_special_tokens else []) + [3 + ord(c) % 125 for c in text]
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)


def word_corpus() -> Any:
    """3,000 random words from a small vocabulary: calibration / training text for the tiny models."""
    from efficiency.data import Corpus

    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran over hills and rivers under grey skies".split()
    return Corpus("tiny.txt", "memory", " ".join(rng.choice(words) for _ in range(3000)))


def save_tiny_gpt2(folder: Path, n_positions: int = 128, n_embd: int = 64) -> None:
    """A 2-layer GPT-2 with random weights and the real GPT-2 tokenizer, saved as an HF folder (skips the test
    when the tokenizer files are not in the offline data folder)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok_dir = SHARED_DATA / "architectures" / "gpt2"
    if not tok_dir.is_dir():
        pytest.skip(f"GPT-2 tokenizer files not found under {tok_dir}")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_positions=n_positions, n_embd=n_embd, n_layer=2, n_head=4)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(folder)


class FakeHub:
    """A local HTTP server that answers as the Hugging Face hub does for one repository's files (``resolve``: HEAD
    and GET with the commit and ETag headers huggingface_hub reads; anything else 404), recording each request, so
    that the real hub-loading code runs against files on this machine. ``HF_ENDPOINT`` points at it and the hub is
    online for the test (the environment reaches a subprocess; huggingface_hub's constants, read at import, are
    patched for this one)."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, repo: str, files: dict[str, bytes]) -> None:
        import hashlib
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, with_body: bool) -> None:
                hub.requests.append((self.command, self.path))
                prefix = f"/{repo}/resolve/"
                name = self.path.split("?")[0].removeprefix(prefix).split("/", 1)[-1]
                body = files.get(name) if self.path.startswith(prefix) else None
                if body is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Repo-Commit", hub.COMMIT)
                self.send_header("ETag", f'"{hashlib.sha1(body).hexdigest()}"')
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def do_HEAD(self) -> None:  # noqa: N802 (http.server's names)
                self._answer(False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(True)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        # a short poll: shutdown() waits for the loop to look (0.5 s by default, at each test's teardown)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def files_fetched(self) -> set[str]:
        return {path.split("?")[0].rsplit("/", 1)[-1] for method, path in self.requests
                if method == "GET" and "/resolve/" in path}


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """``fake_hub(repo, files)``: a :class:`FakeHub` serving ``files`` ({name: bytes}) as ``repo``, with an empty
    HF cache under tmp_path and the hub online (every place huggingface_hub keeps the endpoint points at it, then back).
    """
    import huggingface_hub.constants as hf_constants
    import huggingface_hub.hf_api as hf_api  # its module-level HfApi keeps the endpoint it was built with
    import transformers.utils.hub as transformers_hub  # so does transformers' shared HfApi, once built

    hubs: list[FakeHub] = []

    def start(repo: str, files: dict[str, bytes]) -> FakeHub:
        hub = FakeHub(repo, files)
        hubs.append(hub)
        cache = tmp_path / "hf-home" / "hub"
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
        monkeypatch.setattr(transformers_hub, "_hf_api", None, raising=False)  # rebuilt at its next use
        return hub

    yield start
    for hub in hubs:
        hub.server.shutdown()
        hub.server.server_close()


def make_reports() -> Any:
    """fixtures/make_reports.py as a module (the one generator of stored and simulated reports)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_reports", REPO / "fixtures" / "make_reports.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip, saying why, where torch sees no CUDA device (CI, the 2-core machines)."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False here")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
