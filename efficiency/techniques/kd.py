"""The distillation recipe: settings with per-device training budgets, the KD loss and the lr schedule.

Loss per token, with p_T = softmax(z_teacher / T) and q_T = softmax(z_student / T):

    forward KL:  T^2 * sum_v p_T(v) * (log p_T(v) - log q_T(v))      (mode covering, the classic KD loss)
    reverse KL:  T^2 * sum_v q_T(v) * (log q_T(v) - log p_T(v))      (mode seeking)
    total      = (1 - alpha) * KL  +  alpha * CE(q_1, next token)

The T^2 keeps the gradient scale independent of T (the soft-target gradients shrink as 1/T^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

# Per-device defaults of the settings left None. GPU: the budget the recipe was tuned with. CPU: sized so that
# minitron-w25 and distil-d50 on SmolLM2-135M finish their apply step in well under 10 minutes on 2 shared
# cores (training runs at ~30 tokens/s there; docs/results.md): recovery is partial, and the report says how
# much (held-out perplexity before and after training).
DEVICE_DEFAULTS: dict[str, dict[str, int]] = {
    "cuda": {"tokens": 200_000, "batch_size": 8, "heldout_tokens": 8192},
    "cpu": {"tokens": 4096, "batch_size": 4, "heldout_tokens": 2048},
}


@dataclass(frozen=True)
class KdSettings:
    """Training recipe. ``tokens`` is the training budget (tokens seen by the student). ``tokens``,
    ``batch_size`` and ``heldout_tokens`` left None take the device's default (``DEVICE_DEFAULTS``, or
    ``gpu_tokens`` / ``cpu_tokens`` for the budget); every field is settable as a technique option.
    The peak lr was picked on SmolLM2-135M (H100, 200k tokens: 1e-3 recovered distil-d50 to WikiText-2
    perplexity 110 against 181 at 2e-4, minitron-w25 to 48.7 against 49.1); larger models likely want less."""

    tokens: int | None = None
    gpu_tokens: int = DEVICE_DEFAULTS["cuda"]["tokens"]
    cpu_tokens: int = DEVICE_DEFAULTS["cpu"]["tokens"]
    batch_size: int | None = None
    seq_len: int = 256
    lr: float = 1e-3
    temperature: float = 1.0
    kl: str = "forward"  # "forward" | "reverse"
    alpha: float = 0.0  # weight of the next-token cross-entropy
    schedule: str = "cosine"  # "cosine" | "linear" decay after warmup
    warmup: float = 0.05  # fraction of the steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    heldout_tokens: int | None = None
    seed: int | None = None  # None: ctx.seed

    def __post_init__(self) -> None:
        counts = [t for t in (self.tokens, self.gpu_tokens, self.cpu_tokens, self.batch_size) if t is not None]
        if min(counts) < 1 or self.seq_len < 2 or (self.heldout_tokens or self.seq_len) < self.seq_len:
            raise ValueError("tokens and batch_size must be >= 1, seq_len >= 2 and heldout_tokens >= seq_len")
        if self.kl not in ("forward", "reverse") or self.schedule not in ("cosine", "linear"):
            raise ValueError(f"kl: forward|reverse, schedule: cosine|linear; got {self.kl}, {self.schedule}")
        if not (0.0 <= self.alpha <= 1.0 and 0.0 <= self.warmup < 1.0 and 0.0 <= self.min_lr_ratio <= 1.0):
            raise ValueError("alpha and min_lr_ratio must lie in [0, 1] and warmup in [0, 1)")
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError("temperature and lr must be > 0")

    def for_device(self, device: str) -> KdSettings:
        """These settings with every None filled with the default of ``device`` ("cuda..." or anything else)."""
        kind = "cuda" if device.startswith("cuda") else "cpu"
        defaults = DEVICE_DEFAULTS[kind]
        return replace(
            self,
            tokens=self.tokens if self.tokens is not None else (self.gpu_tokens if kind == "cuda" else self.cpu_tokens),
            batch_size=self.batch_size or defaults["batch_size"],
            heldout_tokens=self.heldout_tokens or max(self.seq_len, defaults["heldout_tokens"]),
        )

    def _resolved(self, value: int | None, what: str) -> int:
        if value is None:
            raise ValueError(f"{what} depends on the device: call for_device() first")
        return value

    @property
    def batch(self) -> int:
        return self._resolved(self.batch_size, "batch_size")

    @property
    def heldout(self) -> int:
        return self._resolved(self.heldout_tokens, "heldout_tokens")

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self._resolved(self.tokens, "tokens") / (self.batch * self.seq_len)))


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    kl: str = "forward",
    alpha: float = 0.0,
) -> torch.Tensor:
    """Mean over tokens of the loss in the module docstring. Logits (B, L, V); labels (B, L) are the input
    ids (position t is scored against label t+1) and are needed only when ``alpha > 0``."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, L, V)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kl == "forward":
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, L)
    elif kl == "reverse":
        per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        raise ValueError(f"kl must be 'forward' or 'reverse', got {kl!r}")
    loss = temperature**2 * per_token.mean()
    if alpha == 0.0:
        return loss
    if labels is None:
        raise ValueError("alpha > 0 needs labels")
    vocab = student_logits.size(-1)
    ce = F.cross_entropy(student_logits[:, :-1].float().reshape(-1, vocab), labels[:, 1:].reshape(-1))
    return (1.0 - alpha) * loss + alpha * ce


def lr_factor(step: int, total: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warmup to 1 over ``warmup_steps``, then decay
    to ``min_ratio`` at the last step: cosine ``m + (1 - m) * (1 + cos(pi * s)) / 2`` or linear
    ``1 - (1 - m) * s``, with s = (step - warmup) / (total - 1 - warmup) in [0, 1]."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total - 1 - warmup_steps)
    s = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * s))
    return 1.0 - (1.0 - min_ratio) * s
