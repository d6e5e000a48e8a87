from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from efficiency.data import DataUnavailable, load_calibration_text, load_corpus, tokenize


def test_wikitext_from_the_data_dir(shared_data: Path) -> None:
    corpus = load_corpus("wikitext2", shared_data)
    assert corpus.name == "wikitext2-raw-test" and len(corpus.text.encode()) == 1_290_590
    assert " = Robert Boulter = " in corpus.text[:100]


def test_missing_data_dir_says_what_to_provide(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailable, match="wikitext-2-raw/wiki.test.raw"):
        load_corpus("wikitext2", tmp_path)
    with pytest.raises(DataUnavailable, match="does not exist"):
        load_corpus(str(tmp_path / "nope.txt"), None)


def test_calibration_is_the_validation_split(shared_data: Path) -> None:
    assert load_calibration_text(None, shared_data).name == "valid.txt"


def test_tokenize_caches_and_counts_gpt2_tokens(shared_data: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_data / "architectures" / "gpt2")
    corpus = load_corpus("wikitext2", shared_data)
    ids = tokenize(corpus, tok, tmp_path)
    assert len(ids) == 286_221  # the data README's count for GPT-2
    (cache,) = (tmp_path / "tokens").glob("*.pt")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o666 & ~umask  # before: 0o600 (mkstemp's), unlike a plain file
    assert tokenize(corpus, tok, tmp_path, max_tokens=100).tolist() == ids[:100].tolist()


def test_check_inputs_refuses_empty_binary_and_short_files(tmp_path: Path) -> None:
    import pytest

    from efficiency.config import ConfigError
    from efficiency.data import check_inputs, check_text_file

    empty, binary, short, good = (tmp_path / n for n in ("e.txt", "b.bin", "s.txt", "g.txt"))
    empty.write_text("  \n")
    binary.write_bytes(bytes(range(256)))
    short.write_text("a few words")
    good.write_text("word " * 100)
    for path, message in ((empty, "is empty"), (binary, "not UTF-8"), (short, "too short: 11 bytes"),
                          (tmp_path / "none.txt", "does not exist")):
        with pytest.raises(ConfigError, match=f"{path.name}.*{message}"):
            check_text_file(path, 64, "dataset file")
    check_inputs(str(good), None, 64)
    with pytest.raises(ConfigError, match="wiki.test.raw not found"):
        check_inputs("wikitext2", tmp_path, 64)


def test_token_cache_uses_unique_temporary_names(tmp_path: Path, monkeypatch: Any) -> None:
    # Before: every writer used <cache>.tmp, so concurrent runs and xdist workers could replace each other's file.
    import torch

    from conftest import CharTokenizer
    from efficiency import data

    saved: list[Path] = []
    real_save = torch.save

    def spy(obj: Any, path: Any) -> None:
        saved.append(Path(path))
        real_save(obj, path)

    monkeypatch.setattr(torch, "save", spy)
    corpus = data.Corpus("c", "memory", "hello world " * 20)
    for _ in range(2):
        for f in (tmp_path / "tokens").glob("*.pt"):
            f.unlink()
        ids = data.tokenize(corpus, CharTokenizer(), tmp_path)
    assert len(saved) == 2 and saved[0] != saved[1] and all(p.name.endswith(".tmp") for p in saved)
    assert [p.name for p in (tmp_path / "tokens").iterdir()] == [next((tmp_path / "tokens").glob("*.pt")).name]
    assert torch.equal(data.tokenize(corpus, CharTokenizer(), tmp_path), ids)


def test_a_truncated_token_cache_is_tokenized_again(tmp_path: Path) -> None:
    """Before: torch.load raised on a cut-short cache file ("OSError: [Errno 22] Invalid argument", no file
    named), so every case failed until the cache was deleted by hand."""
    import torch

    from conftest import CharTokenizer
    from efficiency import data

    corpus = data.Corpus("c", "memory", "hello world " * 200)
    ids = data.tokenize(corpus, CharTokenizer(), tmp_path)
    (cache,) = (tmp_path / "tokens").glob("*.pt")
    size = cache.stat().st_size
    with open(cache, "r+b") as f:
        f.truncate(size // 2)
    assert torch.equal(data.tokenize(corpus, CharTokenizer(), tmp_path), ids)
    assert cache.stat().st_size == size  # replaced by a whole one
