from __future__ import annotations

from pathlib import Path

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
    assert len(list((tmp_path / "tokens").glob("*.pt"))) == 1
    assert tokenize(corpus, tok, tmp_path, max_tokens=100).tolist() == ids[:100].tolist()
