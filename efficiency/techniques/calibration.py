"""Calibration sequences for techniques that look at activations (never the evaluation split)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from efficiency.data import tokenize
from efficiency.techniques.base import Context, UnsupportedTechnique

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class CalibrationSpec:
    n_sequences: int = 32
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_sequences < 1 or self.seq_len < 2:
            raise ValueError("calibration needs at least 1 sequence of at least 2 tokens")


def calibration_ids(ctx: Context, spec: CalibrationSpec) -> tuple[torch.Tensor, str]:
    """(ids of shape (n_sequences, seq_len), sha256 of the calibration text) drawn at seeded random offsets."""
    import torch

    if ctx.calibration is None:
        raise UnsupportedTechnique("this technique needs calibration text: pass --eff-calibration or --eff-data-dir")
    corpus = ctx.calibration()
    ids = tokenize(corpus, ctx.tokenizer, ctx.cache_dir)
    if len(ids) <= spec.seq_len:
        raise UnsupportedTechnique(f"calibration text has {len(ids)} tokens, fewer than one sequence of {spec.seq_len}")
    gen = torch.Generator().manual_seed(spec.seed)
    starts = torch.randint(0, len(ids) - spec.seq_len, (spec.n_sequences,), generator=gen)
    return torch.stack([ids[s : s + spec.seq_len] for s in starts.tolist()]), corpus.sha256


def model_fingerprint(model: Any) -> str:
    """Identifies the weights a cached result was computed from: a hash over parameter names, shapes and
    a strided sample of values (cheap, and different for any retrained or pruned model)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
