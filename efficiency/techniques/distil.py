"""Knowledge distillation: ``distil`` swaps in a published student; ``distil-dNN`` / ``distil-wNN`` build a
smaller student from the teacher and train it on the teacher's output distribution (Hinton et al., 2015).

The recipe (settings with per-device training budgets, the KD loss, the lr schedule) is in
:mod:`efficiency.techniques.kd`.

Names: ``distil`` (mode 1), ``distil-dNN`` (keep NN% of the layers, evenly spaced, first and last kept),
``distil-wNN`` (keep NN% of the MLP neurons of every layer, ranked by weight magnitude); ``-rkl`` selects the
reverse KL. The trainer here (:func:`distil_into`) is shared with :mod:`efficiency.techniques.minitron`.

A trained student is cached (``cached_build``: temp folder, then rename) under a key over the model name,
the fingerprints of the source and teacher weights, every training setting, the structure and the data.
``ctx.info[name]`` records cache hit/miss, parameter counts, tokens, steps, losses, held-out perplexity
before and after training, and the training time and energy (kept apart from the inference measurements).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from efficiency.cache import cached_build
from efficiency.data import tokenize, tokenizer_fingerprint
from efficiency.measure.meters import select_meters
from efficiency.measure.perplexity import PerplexityEvaluator
from efficiency.measure.sample import Meter, measure_energy
from efficiency.models import cache_argument, output_cache
from efficiency.techniques.base import Context, TechniqueBase, UnsupportedTechnique, register
from efficiency.techniques.calibration import model_fingerprint
from efficiency.techniques.kd import KdSettings, kd_loss, lr_factor
from efficiency.techniques.progress import Progress

# Teacher -> published distilled student. Only true distillations belong here (a smaller sibling pretrained
# from scratch, such as opt-125m for opt-1.3b, is not a student). Extended via the technique option
# [tool.efficiency.technique.distil] students = {...}.
STUDENTS: dict[str, str] = {"gpt2": "distilgpt2"}
CACHE_FORMAT = 1
HELDOUT_LABEL = "held-out tail of the calibration corpus (not the evaluation split)"

MakeStudent = Callable[[Any, torch.Tensor], tuple[Any, dict[str, Any]]]


# ------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class TrainingData:
    train: torch.Tensor  # (n_sequences, seq_len) int64
    heldout: torch.Tensor  # (n_heldout_tokens,) int64, disjoint from ``train``


@dataclass(frozen=True)
class DataPlan:
    """What the training data will be (``key``, cheap) and how to produce it (``load``, maybe expensive)."""

    key: dict[str, Any]
    load: Callable[[], TrainingData]


def _bos_id(ctx: Context, model: Any) -> int:
    tok = ctx.tokenizer
    for value in (getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None),
                  model.config.bos_token_id):
        if isinstance(value, int) and 0 <= value < model.config.vocab_size:
            return value
    raise UnsupportedTechnique("no BOS/EOS token id inside the vocabulary to start teacher samples from")


@torch.inference_mode()
def sample_from_teacher(
    teacher: Any, bos: int, n: int, seq_len: int, batch: int, seed: int, device: str
) -> torch.Tensor:
    """(n, seq_len) sequences by ancestral sampling (temperature 1, no top-k/p) from BOS, KV-cached."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rows: list[torch.Tensor] = []
    cache_kw = cache_argument(teacher)
    for start in range(0, n, batch):
        ids = torch.full((min(batch, n - start), 1), bos, dtype=torch.long, device=device)  # (b, 1)
        out = teacher(ids, use_cache=True)
        for _ in range(seq_len - 1):
            probs = torch.softmax(out.logits[:, -1].float(), dim=-1)  # (b, V)
            nxt = torch.multinomial(probs, 1, generator=gen)  # (b, 1)
            ids = torch.cat([ids, nxt], dim=1)
            out = teacher(nxt, **{cache_kw: output_cache(out)}, use_cache=True)
        rows.append(ids.cpu())
    return torch.cat(rows)


def plan_data(ctx: Context, teacher: Any, settings: KdSettings, seed: int) -> DataPlan:
    """Training windows at seeded random offsets in the calibration corpus minus its last ``heldout_tokens``
    (the held-out slice); without calibration text, sequences the teacher samples itself from BOS."""
    n_train = settings.steps * settings.batch
    shape = {"n_sequences": n_train, "seq_len": settings.seq_len, "heldout_tokens": settings.heldout,
             "seed": seed}
    if ctx.calibration is None:
        bos = _bos_id(ctx, teacher)
        n_held = math.ceil(settings.heldout / settings.seq_len)

        def generate() -> TrainingData:
            seqs = sample_from_teacher(teacher, bos, n_train + n_held, settings.seq_len, settings.batch,
                                       seed, ctx.device)
            return TrainingData(seqs[:n_train], seqs[n_train:].reshape(-1))

        return DataPlan({"source": "teacher-samples", "bos": bos, **shape}, generate)
    corpus = ctx.calibration()
    ids = tokenize(corpus, ctx.tokenizer, ctx.cache_dir)
    usable = len(ids) - settings.heldout
    if usable <= settings.seq_len:
        raise UnsupportedTechnique(
            f"calibration text has {len(ids)} tokens: too few for {settings.heldout} held-out tokens "
            f"plus training windows of {settings.seq_len}"
        )
    key = {"source": "calibration", "corpus_sha256": corpus.sha256,
           "tokenizer": tokenizer_fingerprint(ctx.tokenizer), **shape}

    def windows() -> TrainingData:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, usable - settings.seq_len + 1, (n_train,), generator=gen)
        train = torch.stack([ids[s : s + settings.seq_len] for s in starts.tolist()])
        return TrainingData(train, ids[usable:].clone())

    return DataPlan(key, windows)


# ----------------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    steps: int
    tokens: int
    loss_step0: float
    loss_final: float
    loss_curve: list[float]  # loss at up to ~20 evenly spaced steps
    time_s: float
    energy: dict[str, Any]  # EnergySample.to_dict(): energy_j None plus a reason when not measurable
    method: str = "wall clock and energy between device syncs around the whole training loop"


def _autocast(ctx: Context) -> Any:
    if ctx.is_cuda:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _meter(ctx: Context) -> tuple[Meter, Callable[[], None]]:
    """The run's primary meter (the one place choosing it: measure/meters.py) and the device sync."""
    meter = select_meters(ctx.device).primary
    return meter, (torch.cuda.synchronize if ctx.is_cuda else lambda: None)


def train_student(
    student: Any, teacher: Any, train: torch.Tensor, settings: KdSettings, ctx: Context, seed: int, desc: str
) -> TrainResult:
    """AdamW on ``kd_loss`` over ``train`` (n, L) in a seeded order; fp32 weights, bf16 autocast on CUDA,
    dropout off (short recovery runs), gradient-norm clipping, warmup then cosine/linear lr decay."""
    torch.manual_seed(seed)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))
    student.float().eval().requires_grad_(True)
    teacher.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay)
    steps, batch, device = settings.steps, settings.batch, ctx.device
    warmup = int(settings.warmup * steps)
    every = max(1, steps // 20)
    losses: list[float] = []
    curve: list[float] = []
    meter, sync = _meter(ctx)
    progress = Progress(ctx.say, f"{desc}: training", steps, "steps")
    with measure_energy(meter, sync) as window:
        for step in range(steps):
            ids = train[order[step * batch : (step + 1) * batch]].to(device)  # (b, L)
            for group in opt.param_groups:
                factor = lr_factor(step, steps, warmup, settings.schedule, settings.min_lr_ratio)
                group["lr"] = settings.lr * factor
            with _autocast(ctx):
                with torch.no_grad():
                    t_logits = teacher(ids, use_cache=False).logits  # (b, L, V)
                s_logits = student(ids, use_cache=False).logits
                loss = kd_loss(s_logits, t_logits, ids, temperature=settings.temperature, kl=settings.kl,
                               alpha=settings.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
            if step % every == 0 or step == steps - 1:
                curve.append(losses[-1])
            progress.update(step + 1, f"loss {losses[-1]:.4f}")
    student.requires_grad_(False)
    assert window.sample is not None
    return TrainResult(steps, steps * batch * train.size(1), losses[0], losses[-1], curve,
                       window.sample.window_s, window.sample.to_dict())


@torch.inference_mode()
def heldout_scores(
    model: Any, teacher: Any | None, ids: torch.Tensor, seq_len: int, ctx: Context
) -> dict[str, Any]:
    """Perplexity of ``model`` on the held-out ids (non-overlapping windows of ``seq_len``) and, given a
    teacher, the mean forward KL(teacher || model) per token at T = 1 on the same windows."""
    was_training = model.training
    model.eval()
    result = PerplexityEvaluator(ids, seq_len, seq_len, 4).run(model, ctx.device)
    out: dict[str, Any] = {"perplexity": result.perplexity, "n_scored_tokens": result.n_scored_tokens}
    if teacher is not None:
        n = len(ids) // seq_len
        chunks = ids[: n * seq_len].reshape(n, seq_len)
        kls = []
        for i in range(0, n, 4):
            batch = chunks[i : i + 4].to(ctx.device)
            with _autocast(ctx):
                kls.append(float(kd_loss(model(batch).logits, teacher(batch).logits)) * len(batch))
        out["kl_from_teacher"] = sum(kls) / max(1, n)
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------- build, train, cache


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _teacher(model: Any, ctx: Context) -> tuple[Any, str]:
    """The original model teaches. As the first step of a pipeline that is the model passed in; after earlier
    steps (``ah90+distil-d50``) the original is loaded again with ``ctx.load_model(ctx.model_name)``."""
    if ctx.steps_done > 0:
        if ctx.load_model is None:
            raise UnsupportedTechnique("distillation after earlier pipeline steps needs the original model as "
                                       "teacher, and this Context cannot load a model (no load_model)")
        ctx.say(f"loading {ctx.model_name} again as the teacher")
        return ctx.load_model(ctx.model_name), "original model (reloaded after earlier pipeline steps)"
    return model, "input model"


def student_cache_parts(
    technique: str, model_name: str, source_fp: str, teacher_fp: str, settings: KdSettings, seed: int,
    structure: Mapping[str, Any], data_key: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything a trained student depends on; any change gives a different cache entry."""
    return {
        "format": CACHE_FORMAT, "technique": technique, "model": model_name, "source": source_fp,
        "teacher": teacher_fp, "settings": asdict(settings), "seed": seed, "structure": dict(structure),
        "data": dict(data_key), "torch": torch.__version__.split("+")[0],
    }


def distil_into(
    model: Any, ctx: Context, *, name: str, kind: str, settings: KdSettings, structure: Mapping[str, Any],
    make_student: MakeStudent,
) -> Any:
    """Build a student with ``make_student(copy of model, train ids)`` -> (student, surgery info), train it
    on the teacher's distribution, cache it, and return it on ``ctx.device`` in the model's dtype."""
    if any(not p.is_floating_point() for p in model.parameters()):
        raise UnsupportedTechnique(f"{name} needs float weights; apply it before quantisation")
    dtype = next(model.parameters()).dtype
    settings = settings.for_device(ctx.device)
    seed = ctx.seed if settings.seed is None else settings.seed
    teacher, teacher_source = _teacher(model, ctx)
    plan = plan_data(ctx, teacher, settings, seed)
    source_fp = model_fingerprint(model)
    teacher_fp = source_fp if teacher is model else model_fingerprint(teacher)
    parts = student_cache_parts(name, ctx.model_name, source_fp, teacher_fp, settings, seed, structure,
                                plan.key)
    built: dict[str, Any] = {}

    def build(tmp: Path) -> None:
        ctx.say(f"{name}: preparing {settings.steps * settings.batch} training sequences of "
                f"{settings.seq_len} tokens ({plan.key['source']})")
        data = plan.load()
        student, surgery = make_student(copy.deepcopy(model), data.train)
        ctx.say(f"{name}: held-out perplexity of teacher and student before training")
        reference = heldout_scores(teacher, None, data.heldout, settings.seq_len, ctx)
        before = heldout_scores(student, teacher, data.heldout, settings.seq_len, ctx)
        result = train_student(student, teacher, data.train, settings, ctx, seed, name)
        after = heldout_scores(student, teacher, data.heldout, settings.seq_len, ctx)
        ctx.say(f"{name}: held-out perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f} "
                f"after {result.steps} steps in {result.time_s:.0f} s")
        record = {
            "structure": surgery, "teacher": teacher_source, "params_teacher": count_params(teacher),
            "params_source": count_params(model), "params_student": count_params(student),
            "settings": asdict(settings), "seed": seed, "data": plan.key, "training": asdict(result),
            "heldout": {"what": HELDOUT_LABEL, "teacher": reference, "before_training": before,
                        "after_training": after},
        }
        student.save_pretrained(tmp)
        (tmp / "result.json").write_text(json.dumps(record, indent=1, default=str))
        built.update(model=student, record=record)

    folder, hit = cached_build(ctx.cache_dir, kind, parts, build)
    if hit:
        from transformers import AutoModelForCausalLM

        auto: Any = AutoModelForCausalLM
        student = auto.from_pretrained(folder, dtype=dtype)
        record = json.loads((folder / "result.json").read_text())
        record["training"]["note"] = "cost of the run that built this cache entry; none spent in this run"
    else:
        student, record = built["model"], built["record"]
    ctx.info[name] = {"cache": "hit" if hit else "miss", "cache_entry": str(folder), **record}
    return student.to(device=ctx.device, dtype=dtype).eval()


# ------------------------------------------------------------------------------------------- techniques


@dataclass(frozen=True)
class PublishedStudent(TechniqueBase):
    """``distil``: replace the model with its published distilled student. ``students`` maps teacher -> student
    name; the option ``[tool.efficiency.technique.distil] students = {...}`` merges over the defaults."""

    students: Mapping[str, str] = field(default_factory=lambda: dict(STUDENTS), hash=False)
    name: str = "distil"

    def _student(self, ctx: Context) -> tuple[str, Callable[[str], Any]]:
        known = dict(self.students)
        student = known.get(ctx.model_name)
        if student is None:
            raise UnsupportedTechnique(
                f"distil: no published student for {ctx.model_name!r} (known: {known}); "
                "register one under [tool.efficiency.technique.distil] students = {...}, or train one with "
                "distil-dNN / distil-wNN"
            )
        loader = ctx.load_model
        if loader is None:
            raise UnsupportedTechnique("distil: this runner's Context cannot load a model (no load_model)")
        return student, loader

    def check(self, ctx: Context) -> None:
        self._student(ctx)

    def apply(self, model: Any, ctx: Context) -> Any:
        student_name, loader = self._student(ctx)
        student = loader(student_name)
        ctx.info[self.name] = {"student": student_name, "teacher": ctx.model_name, "training": None,
                               "params_teacher": count_params(model), "params_student": count_params(student)}
        return student


@dataclass(frozen=True)
class TrainedStudent(TechniqueBase):
    """``distil-dNN``: keep ``keep_pct``% of the layers (evenly spaced, first and last kept);
    ``distil-wNN``: keep ``keep_pct``% of each layer's MLP neurons, ranked by weight magnitude. Then train."""

    axis: str  # "d" | "w"
    keep_pct: int
    settings: KdSettings = KdSettings()

    def __post_init__(self) -> None:
        if self.axis not in ("d", "w") or not 0 < self.keep_pct < 100:
            raise ValueError(f"axis must be d|w and keep_pct in 1..99, got {self.axis}, {self.keep_pct}")

    @property
    def name(self) -> str:
        return f"distil-{self.axis}{self.keep_pct}" + ("-rkl" if self.settings.kl == "reverse" else "")

    def make_student(self, student: Any, train: torch.Tensor, device: str) -> tuple[Any, dict[str, Any]]:
        """Prune ``student`` (a copy of the teacher) in place; ``train`` is unused (weight-based)."""
        from efficiency.techniques import minitron as surgery

        if self.axis == "d":
            n = len(surgery.decoder_layers(student))
            keep = surgery.evenly_spaced(n, max(1, round(n * self.keep_pct / 100)))
            return student, surgery.keep_layers(student, keep)
        scores = surgery.mlp_weight_importance(student)
        kept = max(1, round(scores[0].numel() * self.keep_pct / 100))
        return student, {"mlp": surgery.prune_mlp(student, scores, kept), "importance": "weight norms"}

    def apply(self, model: Any, ctx: Context) -> Any:
        return distil_into(model, ctx, name=self.name, kind="distil", settings=self.settings,
                           structure={"axis": self.axis, "keep_pct": self.keep_pct},
                           make_student=lambda student, train: self.make_student(student, train, ctx.device))


@register(r"distil", "distil", examples=("distil",))
def _distil(m: re.Match[str]) -> PublishedStudent:
    return PublishedStudent()


@register(r"distil-([dw])(\d{1,2})(-rkl)?", "distil-dNN | distil-wNN [-rkl] (student keeps NN%)",
          examples=("distil-d50", "distil-w75", "distil-d50-rkl", "distil-w5"))
def _distil_trained(m: re.Match[str]) -> TrainedStudent:
    return TrainedStudent(m.group(1), int(m.group(2)), KdSettings(kl="reverse" if m.group(3) else "forward"))
