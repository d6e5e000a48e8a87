"""Distillation: KD loss by hand, lr schedule, cache keys and atomicity, published and trained students."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import CharTokenizer
from conftest import word_corpus as corpus
from efficiency.cache import cache_key
from efficiency.techniques.base import Context, UnsupportedTechnique, parse
from efficiency.techniques.distil import (
    KdSettings,
    PublishedStudent,
    TrainedStudent,
    distil_into,
    kd_loss,
    lr_factor,
    sample_from_teacher,
    student_cache_parts,
)

TINY = KdSettings(tokens=2048, batch_size=4, seq_len=32, lr=1e-3, warmup=0.1, heldout_tokens=256)


def llama_teacher(layers: int = 4) -> Any:
    """A 4-layer GQA Llama with its LM head and MLP outputs scaled up, so that its distributions are peaked
    and every block matters: random initial weights leave too little for a few training steps to recover."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, max_position_embeddings=64, hidden_size=48, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=4, intermediate_size=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(8)
    return model


def make_ctx(cache: Path, calibration: bool = True) -> Context:
    return Context("cpu", CharTokenizer(), "tiny-llama", cache, calibration=corpus if calibration else None,
                   progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------- KD loss by hand


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


S = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]  # student logits at 2 positions, vocabulary 3
T = [[2.0, -1.0, 0.0], [0.0, 1.0, 1.0]]  # teacher logits


def _logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([rows])  # (1, 2, 3)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_matches_hand_computation(temperature: float) -> None:
    def soft(z: list[float]) -> list[float]:
        return _softmax([v / temperature for v in z])

    expected = sum(_kl(soft(t), soft(s)) for s, t in zip(S, T, strict=True)) / 2 * temperature**2
    got = kd_loss(_logits(S), _logits(T), temperature=temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_reverse_kl_matches_hand_computation() -> None:
    tau = 2.0
    expected = sum(
        _kl(_softmax([v / tau for v in s]), _softmax([v / tau for v in t])) for s, t in zip(S, T, strict=True)
    ) / 2 * tau**2
    got = kd_loss(_logits(S), _logits(T), temperature=tau, kl="reverse")
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() != pytest.approx(kd_loss(_logits(S), _logits(T), temperature=tau).item(), rel=1e-3)


def test_ce_mix_matches_hand_computation() -> None:
    labels = torch.tensor([[0, 2]])  # position 0 predicts label 2
    kl = sum(_kl(_softmax(t), _softmax(s)) for s, t in zip(S, T, strict=True)) / 2
    ce = -math.log(_softmax(S[0])[2])
    got = kd_loss(_logits(S), _logits(T), labels, alpha=0.25)
    assert got.item() == pytest.approx(0.75 * kl + 0.25 * ce, rel=1e-5)
    with pytest.raises(ValueError):
        kd_loss(_logits(S), _logits(T), None, alpha=0.5)


def test_kd_loss_is_zero_for_identical_logits() -> None:
    z = torch.randn(2, 5, 7)
    assert kd_loss(z, z.clone(), kl="reverse", temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    assert lr_factor(0, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(99, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(99, 100, 10, "linear", 0.0) == pytest.approx(0.0)
    mid = 10 + (99 - 10) / 2
    assert lr_factor(int(mid), 100, 10, "linear", 0.0) == pytest.approx(1 - (int(mid) - 10) / 89)


def test_settings_validate() -> None:
    with pytest.raises(ValueError):
        KdSettings(kl="sideways")
    with pytest.raises(ValueError):
        KdSettings(alpha=1.5)
    assert KdSettings(tokens=1000, batch_size=2, seq_len=100).steps == 5


# ------------------------------------------------------------------------------------------------- cache


def test_cache_key_changes_with_every_input() -> None:
    base: dict[str, Any] = dict(technique="distil-d50", model_name="m", source_fp="s", teacher_fp="t",
                                settings=TINY, seed=0, structure={"keep_pct": 50}, data_key={"sha": "a"})
    variants: list[dict[str, Any]] = [
        {"technique": "distil-d25"}, {"model_name": "m2"}, {"source_fp": "s2"}, {"teacher_fp": "t2"},
        {"settings": KdSettings(**{**TINY.__dict__, "lr": 2e-3})},
        {"settings": KdSettings(**{**TINY.__dict__, "kl": "reverse"})},
        {"settings": KdSettings(**{**TINY.__dict__, "tokens": 4096})},
        {"seed": 1}, {"structure": {"keep_pct": 25}}, {"data_key": {"sha": "b"}},
    ]
    keys = {cache_key(student_cache_parts(**base))}
    for change in variants:
        keys.add(cache_key(student_cache_parts(**{**base, **change})))
    assert len(keys) == len(variants) + 1


def test_failed_build_leaves_no_entry_and_the_next_build_succeeds(tmp_path: Path) -> None:
    from efficiency.techniques import minitron

    teacher, ctx = llama_teacher(), make_ctx(tmp_path)
    calls = {"n": 0}

    def make(student: Any, train: torch.Tensor) -> tuple[Any, dict[str, Any]]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("killed midway")
        return student, minitron.keep_layers(student, [0, 3])

    kw: dict[str, Any] = {"name": "distil-test", "kind": "distil", "settings": TINY, "structure": {},
                          "make_student": make}
    with pytest.raises(RuntimeError, match="killed midway"):
        distil_into(teacher, ctx, **kw)
    assert not any((tmp_path / "distil").iterdir())  # neither an entry nor a temp folder
    distil_into(teacher, ctx, **kw)
    assert ctx.info["distil-test"]["cache"] == "miss"
    distil_into(teacher, ctx, **kw)
    assert ctx.info["distil-test"]["cache"] == "hit" and calls["n"] == 2
    assert len(list((tmp_path / "distil").iterdir())) == 1


# ------------------------------------------------------------------------------------------- techniques


def test_names_parse() -> None:
    pipe = parse("distil+distil-d50+distil-w75-rkl")
    assert [s.name for s in pipe] == ["distil", "distil-d50", "distil-w75-rkl"]
    assert isinstance(pipe.steps[2], TrainedStudent) and pipe.steps[2].settings.kl == "reverse"


def test_published_student(tmp_path: Path) -> None:
    ctx = Context("cpu", None, "gpt2", tmp_path)
    with pytest.raises(UnsupportedTechnique, match="load_model"):
        PublishedStudent().check(ctx)
    loaded: list[str] = []
    student = llama_teacher(layers=2)

    def load(name: str) -> Any:
        loaded.append(name)
        return student

    ctx.load_model = load
    assert PublishedStudent().apply(llama_teacher(), ctx) is student
    assert loaded == ["distilgpt2"] and ctx.info["distil"]["student"] == "distilgpt2"
    other = Context("cpu", None, "opt-1.3b", tmp_path)
    with pytest.raises(UnsupportedTechnique, match="distil-dNN"):
        PublishedStudent().check(other)
    other.load_model = load
    PublishedStudent(students={"opt-1.3b": "my-opt-student"}).check(other)


@pytest.mark.parametrize("axis", ["d", "w"])
def test_trained_student_end_to_end(tmp_path: Path, axis: str) -> None:
    teacher = llama_teacher()
    before = [p.clone() for p in teacher.parameters()]
    ctx = make_ctx(tmp_path)
    student = TrainedStudent(axis, 50, TINY).apply(teacher, ctx)
    info = ctx.info[f"distil-{axis}50"]
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))  # teacher intact
    assert info["cache"] == "miss" and info["params_student"] < info["params_teacher"]
    if axis == "d":
        assert student.config.num_hidden_layers == 2 and info["structure"]["layers_kept"] == [0, 3]
    else:
        assert student.config.intermediate_size == 32
    training = info["training"]
    assert training["steps"] == TINY.steps and training["tokens"] == 2048
    assert training["loss_final"] < training["loss_step0"]
    held = info["heldout"]
    assert held["after_training"]["kl_from_teacher"] < held["before_training"]["kl_from_teacher"]
    assert "not the evaluation split" in held["what"]
    assert training["energy"]["energy_j"] is None or training["energy"]["energy_j"] >= 0
    assert training["energy"]["energy_j"] is not None or training["energy"]["reason"]
    # a second apply loads the same student from the cache
    ctx2 = make_ctx(tmp_path)
    again = TrainedStudent(axis, 50, TINY).apply(teacher, ctx2)
    ids = torch.arange(3, 19)[None]
    assert ctx2.info[f"distil-{axis}50"]["cache"] == "hit"
    torch.testing.assert_close(again(ids).logits, student(ids).logits)


def test_training_is_reproducible_and_teacher_samples_stand_in_for_calibration(tmp_path: Path) -> None:
    teacher = llama_teacher()
    a = sample_from_teacher(teacher, 1, 3, 8, 2, seed=5, device="cpu")
    assert a.shape == (3, 8) and (a[:, 0] == 1).all()
    assert torch.equal(a, sample_from_teacher(teacher, 1, 3, 8, 2, seed=5, device="cpu"))
    settings = KdSettings(tokens=256, batch_size=2, seq_len=16, lr=1e-3, heldout_tokens=32)
    students = []
    for run in ("one", "two"):
        ctx = make_ctx(tmp_path / run, calibration=False)
        students.append(TrainedStudent("d", 50, settings).apply(teacher, ctx))
        assert ctx.info["distil-d50"]["data"]["source"] == "teacher-samples"
    ids = torch.arange(3, 19)[None]
    torch.testing.assert_close(students[0](ids).logits, students[1](ids).logits)


def test_published_student_from_the_configured_registry(tmp_path: Path) -> None:
    from conftest import tiny_model

    student = tiny_model("gpt2", seed=1)
    loaded: list[str] = []

    def load_model(name: str) -> Any:
        loaded.append(name)
        return student

    ctx = Context("cpu", None, "tiny-teacher", tmp_path, load_model=load_model)
    pipeline = parse("distil", {"distil": {"students": {"tiny-teacher": "tiny-s"}}})
    assert dict(pipeline.steps[0].students) == {"gpt2": "distilgpt2", "tiny-teacher": "tiny-s"}  # type: ignore[attr-defined]
    out = pipeline.apply(tiny_model("gpt2"), ctx)
    assert out is student and loaded == ["tiny-s"] and ctx.info["distil"]["student"] == "tiny-s"
    with pytest.raises(UnsupportedTechnique, match="no published student"):
        parse("distil").check(Context("cpu", None, "unknown", tmp_path, load_model=load_model))


def test_the_original_is_reloaded_as_teacher_only_after_earlier_steps(tmp_path: Path) -> None:
    from conftest import tiny_model
    from efficiency.techniques.distil import _teacher

    loads: list[int] = []
    original = tiny_model("gpt2", seed=3)

    def reload(name: str) -> Any:
        assert name == "tiny"
        loads.append(1)
        return original

    model = tiny_model("gpt2")
    ctx = Context("cpu", None, "tiny", tmp_path, load_model=reload)
    assert _teacher(model, ctx) == (model, "input model") and loads == []  # first step: no second load
    ctx.steps_done = 1
    teacher, source = _teacher(model, ctx)
    assert teacher is original and loads == [1] and source.startswith("original model")


def test_training_reports_progress_through_ctx_log(tmp_path: Path) -> None:
    lines: list[str] = []
    ctx = Context("cpu", CharTokenizer(), "tiny-llama", tmp_path, calibration=corpus, log=lines.append)
    TrainedStudent("d", 50, TINY).apply(llama_teacher(), ctx)
    training = [line for line in lines if ": training:" in line]
    assert training[0].startswith(f"distil-d50: training: 1/{TINY.steps} steps")  # the ETA: from the 2nd line
    assert training[-1].startswith(f"distil-d50: training: {TINY.steps}/{TINY.steps} steps (100%)")
    assert any("held-out perplexity" in line and "->" in line for line in lines)
    quiet: list[str] = []
    ctx = Context("cpu", CharTokenizer(), "tiny-llama", tmp_path / "q", calibration=corpus, log=quiet.append,
                  progress=False)
    TrainedStudent("d", 50, TINY).apply(llama_teacher(), ctx)
    assert quiet == []


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_teacher_sampling_with_its_kv_cache_equals_sampling_without(family: str) -> None:
    """The KV-cached ancestral sampler gives the sequences a cache-free loop gives with the same generator, and
    passes the cache under the keyword forward takes (transformers 5.24 deprecates ``past_key_values``)."""
    import warnings

    from conftest import tiny_model
    from efficiency.techniques.distil import sample_from_teacher

    teacher = tiny_model(family)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        got = sample_from_teacher(teacher, bos=1, n=3, seq_len=6, batch=2, seed=5, device="cpu")
    gen = torch.Generator().manual_seed(5)
    rows = []
    with torch.inference_mode():
        for start in (0, 2):
            ids = torch.full((min(2, 3 - start), 1), 1, dtype=torch.long)
            for _ in range(5):
                probs = torch.softmax(teacher(ids, use_cache=False).logits[:, -1].float(), dim=-1)
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
            rows.append(ids)
    assert torch.equal(got, torch.cat(rows))
