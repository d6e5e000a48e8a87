"""Evaluation corpora: WikiText-2 raw test (local folder or ``datasets``) or any local text file.

The text is tokenised once per (text, tokenizer) and cached on disk as a tensor, keyed by the text's sha256 and a
fingerprint of the tokenizer, so every case of a run (and later runs) reuses the same token ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from efficiency.errors import ConfigError, DataUnavailable
from efficiency.files import give_usual_mode

if TYPE_CHECKING:
    import torch

__all__ = ["CALIBRATION_RELPATH", "WIKITEXT_RELPATH", "Corpus", "DataUnavailable", "check_inputs", "check_text_file",
           "load_calibration_text", "load_corpus", "tokenize", "tokenizer_fingerprint"]

WIKITEXT_RELPATH = Path("wikitext-2-raw") / "wiki.test.raw"
CALIBRATION_RELPATH = Path("wikitext-2") / "valid.txt"


# Where a case's report records the sha256 of the calibration text its techniques read (technique_info), when
# they read one.
CALIBRATION_KEY = "calibration_sha256"


def check_text_file(path: Path, min_tokens: int, what: str) -> None:
    """Refuse, before any model loads, a text file that is missing, empty, not UTF-8, or certainly shorter than
    ``min_tokens`` tokens. The length test is conservative: a token of a byte-level tokenizer covers at least one
    byte, so a file of fewer bytes than ``min_tokens`` cannot hold that many tokens."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    data = path.read_bytes()
    if not data.strip():
        raise ConfigError(f"{what} {path} is empty")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {err.start}: {err.reason}); "
                          "give a UTF-8 text file") from None
    if len(data) < min_tokens:
        raise ConfigError(f"{what} {path} is too short: {len(data)} bytes cannot hold the {min_tokens} tokens of one "
                          "window (lower --eff-context / --eff-max-tokens or give a longer text)")


def check_inputs(dataset: str, data_dir: Path | None, min_tokens: int) -> None:
    """The evaluation text the run will use, checked cheaply before any model loads (:func:`check_text_file`).
    WikiText-2 without a data folder comes from ``datasets`` when a case runs and is not checked here."""
    if dataset != "wikitext2":
        check_text_file(Path(dataset).expanduser(), min_tokens, "dataset file")
    elif data_dir is not None:
        if not (data_dir / WIKITEXT_RELPATH).is_file():
            raise ConfigError(f"{data_dir / WIKITEXT_RELPATH} not found: --eff-data-dir / EFFICIENCY_DATA_DIR / "
                              f"[tool.efficiency] data-dir must be a folder holding {WIKITEXT_RELPATH}")
        check_text_file(data_dir / WIKITEXT_RELPATH, min_tokens, "dataset file")


@dataclass(frozen=True)
class Corpus:
    name: str  # "wikitext2-raw-test" or the file name
    source: str  # where the text came from
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def data_dir_from_env(explicit: Path | None) -> Path | None:
    if explicit is not None:
        return explicit
    env = os.environ.get("EFFICIENCY_DATA_DIR")
    return Path(env) if env else None


def load_corpus(dataset: str, data_dir: Path | None) -> Corpus:
    """``dataset`` is ``wikitext2`` (the raw test split) or a path to a UTF-8 text file."""
    if dataset != "wikitext2":
        path = Path(dataset).expanduser()
        if not path.is_file():
            raise DataUnavailable(
                f"dataset file {path} does not exist (--eff-dataset takes 'wikitext2' or a .txt path)"
            )
        return Corpus(path.name, str(path.resolve()), path.read_text(encoding="utf-8"))
    if data_dir is not None:
        path = data_dir / WIKITEXT_RELPATH
        if path.is_file():
            return Corpus("wikitext2-raw-test", str(path.resolve()), path.read_text(encoding="utf-8"))
        raise DataUnavailable(f"{path} not found: --eff-data-dir / EFFICIENCY_DATA_DIR must hold {WIKITEXT_RELPATH}")
    try:
        import datasets

        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as err:  # offline, no `datasets`, hub error: all mean "not here"
        raise DataUnavailable(
            "WikiText-2 is not reachable through `datasets` here "
            f"({type(err).__name__}: {str(err)[:160]}). Point --eff-data-dir (or EFFICIENCY_DATA_DIR) at a folder "
            f"with {WIKITEXT_RELPATH}, e.g. ../shared/data"
        ) from err
    # Hugging Face's perplexity recipe joins the rows with blank lines.
    return Corpus("wikitext2-raw-test", "datasets:wikitext/wikitext-2-raw-v1/test", "\n\n".join(rows["text"]))


def load_calibration_text(path: Path | None, data_dir: Path | None) -> Corpus:
    """Calibration / training text, never the evaluation split (default: WikiText-2 validation, non-raw)."""
    if path is None:
        if data_dir is None:
            raise DataUnavailable(
                "no calibration text: pass --eff-calibration FILE or --eff-data-dir with wikitext-2/valid.txt"
            )
        path = data_dir / CALIBRATION_RELPATH
    if not path.is_file():
        raise DataUnavailable(f"calibration file {path} not found")
    return Corpus(path.name, str(path.resolve()), path.read_text(encoding="utf-8"))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identifies a tokenizer's behaviour: class, vocabulary size, special tokens, and its full JSON when fast."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(str(len(tokenizer)).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    return h.hexdigest()[:16]


def _cached_ids(path: Path) -> Any:
    """The token ids a cache file holds, or None when it cannot be read as a 1-D integer tensor (truncated, or
    written by something else): the caller tokenizes again and replaces it."""
    import torch

    try:
        ids = torch.load(path, weights_only=True)
    except Exception:  # torch.load raises OSError, EOFError, RuntimeError or pickle errors on damaged files
        return None
    ok = isinstance(ids, torch.Tensor) and ids.dim() == 1 and not ids.is_floating_point() and ids.numel() > 0
    return ids if ok else None


def tokenize(corpus: Corpus, tokenizer: Any, cache_dir: Path | None, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of the whole corpus, shape (n_tokens,), cached; ``max_tokens`` keeps a prefix."""
    import torch

    ids: torch.Tensor | None = None
    cache: Path | None = None
    if cache_dir is not None:
        cache = cache_dir / "tokens" / f"{corpus.sha256[:16]}-{tokenizer_fingerprint(tokenizer)}.pt"
        if cache.is_file():
            ids = _cached_ids(cache)
    if ids is None:
        encoded = tokenizer(corpus.text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        # Where the tokenizer itself starts a text with BOS (OPT, Llama), the corpus starts with one too.
        probe = tokenizer("a").input_ids
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and len(probe) > 0 and probe[0] == bos
        ids = torch.cat([torch.tensor([bos]), encoded]) if adds_bos else encoded
        if cache is not None:  # a unique temporary name: concurrent runs and xdist workers write side by side
            cache.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.stem}.", suffix=".tmp")
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                torch.save(ids, tmp)
                give_usual_mode(tmp, cache)
                tmp.replace(cache)
            finally:
                tmp.unlink(missing_ok=True)
    return ids[:max_tokens] if max_tokens is not None else ids
