"""KL divergence against the baseline: 0 for the baseline against itself, grows with pruning and 4-bit
quantisation, and the top-k reference is a close lower bound of the full-vocabulary value."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import byte_context, tiny_model
from efficiency.config import Workload
from efficiency.data import DataUnavailable
from efficiency.measure.kld import compare, reference
from efficiency.phases.base import PhaseContext, run_phase
from efficiency.phases.kld import KldPhase
from efficiency.phases.quality_settings import KldSettings
from efficiency.techniques.base import parse


def phase_context(tokens: Any, store: dict[str, Any], is_baseline: bool, context: int = 32) -> PhaseContext:
    from efficiency.measure.energy import NullMeter

    return PhaseContext(case_id="tiny-case", device="cpu", workload=Workload(context=context, stride=context,
                        min_rounds=1), tokens=tokens, tokenizer=None, context=context, stride=context,
                        meters={"cpu": NullMeter("test")}, primary="cpu", sync=lambda: None, store=store,
                        model_name="tiny", is_baseline=is_baseline)


def tokens(n: int = 96) -> Any:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(1))


def full_kl(base: Any, case: Any, ids: Any, context: int) -> Any:
    """The full-vocabulary KL per position, computed directly (the reference implementation)."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(ids), context):
            chunk = ids[s:s + context].unsqueeze(0)
            lp = torch.log_softmax(base(chunk).logits[0].float(), -1)
            lq = torch.log_softmax(case(chunk).logits[0].float(), -1)
            out.append((lp.exp() * (lp - lq)).sum(-1))
    return torch.cat(out)


def test_baseline_against_itself_is_zero_through_the_phase(one_thread: None) -> None:
    model = tiny_model("llama")
    store: dict[str, Any] = {}
    ctx = phase_context(tokens(), store, is_baseline=True)
    phase = KldPhase(KldSettings(tokens=64))
    record = run_phase(phase, model, ctx)
    section = phase.section(record, ctx)["kld"]
    assert section["n_tokens"] == 64 and section["exact"]  # the default k covers the 128-token vocabulary
    assert section["mean"] == 0.0 and section["p99"] == 0.0 and section["top1_match"] == 1.0
    assert section["tail_mass_mean"] == 0.0 and section["reference_bytes"] > 0


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_grows_with_mag50_and_bnb4(family: str, tmp_path: Path, one_thread: None) -> None:
    pytest.importorskip("bitsandbytes")
    base = tiny_model(family)
    store: dict[str, Any] = {}
    ids = tokens()
    run_phase(KldPhase(KldSettings(tokens=96)), base, phase_context(ids, store, is_baseline=True))
    results = {}
    for technique in ("bnb4", "mag50"):
        model = parse(technique).apply(copy.deepcopy(base), byte_context(tmp_path))
        ctx = phase_context(ids, store, is_baseline=False)
        phase = KldPhase(KldSettings(tokens=96))
        results[technique] = phase.section(run_phase(phase, model, ctx), ctx)["kld"]
    for r in results.values():
        assert r["mean"] > 1e-5 and r["p99"] >= r["median"] and r["top1_match"] <= 1.0
    # removing half the weights distorts more than 4-bit rounding of all of them
    assert results["mag50"]["mean"] > results["bnb4"]["mean"]
    assert results["mag50"]["top1_match"] < 1.0


def test_top_k_is_a_close_lower_bound_of_the_full_kl(one_thread: None) -> None:
    base, case = tiny_model("gpt2", seed=0), tiny_model("gpt2", seed=0)
    with torch.no_grad():  # a small perturbation: a case close to its baseline, as a compressed model is
        for p in case.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = tokens(64)
    exact = full_kl(base, case, ids, 32)
    full = compare(case, ids, reference(base, ids, 32, "cpu", top_k=128), "cpu")
    assert full.exact and full.mean == pytest.approx(float(exact.mean()), rel=1e-4)
    # an even count of tokens: the median is the mean of the two middle values (before: the lower one)
    assert exact.numel() % 2 == 0
    assert full.median == pytest.approx(float(exact.double().quantile(0.5)), rel=1e-4)
    lumped = compare(case, ids, reference(base, ids, 32, "cpu", top_k=64), "cpu")
    assert not lumped.exact and 0 < lumped.tail_mass_mean < 1
    assert lumped.mean <= full.mean + 1e-7  # the chain rule: lumping the tail never adds divergence
    assert lumped.top1_match == full.top1_match  # top-1 agreement does not depend on k


def test_other_tokens_are_refused(one_thread: None) -> None:
    model = tiny_model("gpt2")
    ref = reference(model, tokens(64), 32, "cpu", top_k=16)
    with pytest.raises(DataUnavailable, match="differ from the baseline"):
        compare(model, tokens(64).flip(0), ref, "cpu")


def test_without_a_baseline_reference_the_phase_says_why() -> None:
    ctx = phase_context(tokens(), {}, is_baseline=False)
    with pytest.raises(DataUnavailable, match="reference is not in this session"):
        KldPhase(KldSettings(tokens=32)).setup(tiny_model("gpt2"), ctx)


def test_top1_agreement_counts_a_tie_with_the_baselines_top_token() -> None:
    """A bf16 baseline against itself read top-1 0.9922 on SmolLM2: argmax and the reference's topk broke ties
    between equal bf16 log-probs differently. The tied token is the case's top token too."""
    from efficiency.measure.kld import top1_agrees

    lq = torch.log_softmax(torch.tensor([[2.0, 2.0, 1.0], [2.0, 2.0, 1.0], [1.0, 3.0, 0.0]]), -1)
    top_id = torch.tensor([1, 0, 0])  # tied with token 0 (argmax's pick), tied and argmax's, below the top
    assert top1_agrees(lq, top_id).tolist() == [True, True, False]


def test_a_case_sharper_than_the_baseline_has_a_finite_kl() -> None:
    """The case's tail mass was 1 - sum(top-k), which rounds to 0 in float32 when the case puts nearly all its
    mass on the baseline's top tokens: the KL read infinite (SmolLM2 bf16 and bnb8 against fp32, fresh clone)."""
    import math

    import torch

    from efficiency.measure.kld import _kl_rows

    vocab, k = 1000, 3
    base = torch.full((1, vocab), -30.0)
    base[0, :k] = torch.tensor([0.0, -1.0, -2.0])
    base_lp = torch.log_softmax(base, -1)
    case = torch.full((1, vocab), -40.0)  # each tail token e^-40 of the top: the sum of the tail rounds away
    case[0, :k] = torch.tensor([0.0, -1.0, -2.0])
    case_lp = torch.log_softmax(case, -1)
    top_logp, top_ids = torch.topk(base_lp, k, dim=-1)
    rest = torch.logsumexp(base_lp[:, k:], dim=-1)
    kl = float(_kl_rows(case_lp, top_ids, top_logp, rest)[0])
    exact = float((base_lp.exp() * (base_lp - case_lp)).sum())
    assert math.isfinite(kl) and 0 < kl <= exact * 1.0001
