"""Sliding-window perplexity (Hugging Face's documented recipe, MEASUREMENT.md), batched.

Windows of ``context`` tokens start every ``stride`` tokens; in each window only the tokens after the previous
window's end are scored, so every token is scored once with up to ``context - 1`` tokens of left context.
perplexity = exp(sum of token NLL / number of scored tokens). Windows of equal shape run in one forward pass;
the result equals the one-window-at-a-time loop (a test checks it).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Window:
    begin: int
    end: int
    trg_len: int  # tokens at the end of the window that are scored (labels of the rest are ignored)

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def n_scored(self) -> int:
        # The window's first token has no left context inside the window, so it is never scored.
        return min(self.trg_len, self.length - 1)


def windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        if end - begin < 2:
            break
        out.append(Window(begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_sum: float
    n_scored_tokens: int
    n_windows: int
    n_tokens: int
    context: int
    stride: int
    batch_size: int
    batch_size_auto: bool = False
    method: str = "sliding-window (HF recipe), sum of token NLL in float32 / scored tokens"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batches(wins: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of the same (length, trg_len) shape, at most ``batch_size`` together."""
    group: list[Window] = []
    for w in wins:
        if group and (len(group) == batch_size or (w.length, w.trg_len) != (group[0].length, group[0].trg_len)):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


AUTO_MAX_BATCH = 64  # beyond this the forward pass is long past saturating any current GPU
AUTO_MEMORY_FRACTION = 0.5  # of the free device memory, the rest is headroom (allocator, compiled graphs)
CPU_AUTO_BATCH = 4  # on the CPU a larger batch buys nothing and costs memory


def window_bytes(config: Any, context: int, keep: int, elem_bytes: int) -> int:
    """Activation bytes one window adds to a forward pass (inference: one layer's activations live at a time):
    hidden states and the MLP's intermediate in the compute dtype, plus the kept logits in the compute dtype
    and two float32 copies of them (the eager cross-entropy's upcast and intermediate; the compiled one on a
    GPU needs neither, so there the figure is an upper bound)."""
    hidden = int(getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0) or 0)
    ffn = int(getattr(config, "ffn_dim", None) or getattr(config, "intermediate_size", None)
              or getattr(config, "n_inner", None) or 4 * hidden)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    per_token = (8 * hidden + 2 * ffn) * elem_bytes
    return context * per_token + keep * vocab * (elem_bytes + 8)


def auto_batch_size(model: Any, context: int, stride: int, device: str | torch.device, n_windows: int,
                    free_bytes: int | None = None) -> int:
    """Windows per forward pass chosen from the model's activation size per window and the free device memory:
    the largest power of two whose activations fit in half the free memory, at most ``AUTO_MAX_BATCH`` and at
    most the number of windows. On the CPU: ``CPU_AUTO_BATCH``."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return max(1, min(CPU_AUTO_BATCH, n_windows))
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(dev)
    elem = 4 if getattr(model, "dtype", None) == torch.float32 else 2  # activations: the model's float dtype
    per_window = max(1, window_bytes(model.config, context, min(stride, context) + 1, elem))
    fit = int(free_bytes * AUTO_MEMORY_FRACTION) // per_window
    batch = 1
    while batch * 2 <= min(fit, AUTO_MAX_BATCH, max(n_windows, 1)):
        batch *= 2
    return batch


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over positions of -log softmax(logits)[label] (logits (..., V), labels (...)), in float32 whatever
    the logits' dtype: the cross-entropy as ``logsumexp - logit of the label``, which a compiler fuses into one
    read of the logits (no float32 copy of the (tokens, vocabulary) matrix, no log-probability matrix)."""
    x = logits.float()
    return (torch.logsumexp(x, dim=-1) - x.gather(-1, labels.unsqueeze(-1)).squeeze(-1)).sum()


@functools.cache
def _compiled_nll() -> Any:
    # dynamic shapes: one graph for every batch and vocabulary size (a static graph per shape reached
    # torch.compile's recompile limit within one run on the H100 and fell back to eager)
    return torch.compile(token_nll_sum, dynamic=True)


def nll_function(device: str | torch.device) -> Any:
    """:func:`token_nll_sum`, compiled on a GPU (one fused reduction; eager it writes and reads the float32
    logits and the log-probabilities, several times the bytes of the logits themselves); eager on the CPU,
    where compiling needs a C compiler."""
    return _compiled_nll() if torch.device(device).type == "cuda" else token_nll_sum


class PerplexityEvaluator:
    """Holds the token ids and the window plan; ``run()`` is the timed "perplexity pass" of a case.

    ``batch_size=None`` means automatic: :func:`auto_batch_size` picks it at the first ``run`` (it needs the
    model) and keeps it, so that every timed pass runs the same batches."""

    def __init__(self, ids: torch.Tensor, context: int, stride: int, batch_size: int | None) -> None:
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D (n_tokens,), got shape {tuple(ids.shape)}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 or None (automatic), got {batch_size}")
        self.ids = ids
        self.context, self.stride = context, stride
        self.batch_size: int | None = batch_size
        self.auto_batch = batch_size is None
        self.plan = windows(len(ids), context, stride)
        self.keeps_logits: bool | None = None  # does the model take logits_to_keep (known after a run)
        if not self.plan:
            raise ValueError(f"{len(ids)} tokens are too few for one window")

    @property
    def n_scored_tokens(self) -> int:
        return sum(w.n_scored for w in self.plan)

    @property
    def window_lengths(self) -> list[int]:
        return [w.length for w in self.plan]

    @property
    def n_logit_positions(self) -> int:
        """Positions whose logits a pass computes (the LM head's share of the FLOPs): each window's scored
        positions and the one before them where the model takes ``logits_to_keep``, every position otherwise."""
        if self.keeps_logits is False:
            return self.n_processed_tokens
        return sum(w.n_scored + 1 for w in self.plan)

    @property
    def n_processed_tokens(self) -> int:
        """Tokens the forward passes process, window overlap counted (the FLOPs side of the pass)."""
        return sum(w.length for w in self.plan)

    def resolve_batch_size(self, model: Any, device: str | torch.device) -> int:
        if self.batch_size is None:
            self.batch_size = auto_batch_size(model, self.context, self.stride, device, len(self.plan))
        return self.batch_size

    def _forward_logits(self, model: Any, batch: torch.Tensor, keep: int) -> torch.Tensor:
        if self.keeps_logits:
            return model(batch, logits_to_keep=keep, use_cache=False).logits  # (B, keep, V)
        return model(batch, use_cache=False).logits[:, -keep:]

    @torch.inference_mode()
    def run(self, model: Any, device: str | torch.device,
            progress: Callable[[int], None] | None = None) -> PerplexityResult:
        """One pass over every window; ``progress(windows done)`` after each batch (its forward enqueued: on a GPU
        the host runs ahead of the device by at most the launch queue)."""
        batch_size = self.resolve_batch_size(model, device)
        done = 0
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        nll_of = nll_function(device)
        nll_sum = torch.zeros((), dtype=torch.float64, device=device)
        for group in _batches(self.plan, batch_size):
            batch = torch.stack([self.ids[w.begin : w.end] for w in group]).to(device)  # (B, L)
            length, trg = group[0].length, group[0].trg_len
            scored = min(trg, length - 1)
            # Logits at positions [L-scored-1, L-1) predict the labels at [L-scored, L).
            logits = self._forward_logits(model, batch, scored + 1)[:, :-1]  # (B, scored, V)
            labels = batch[:, length - scored :]  # (B, scored)
            nll_sum += nll_of(logits, labels).double()  # the slice is a view: no copy of the logits
            done += len(group)
            if progress is not None:
                progress(done)
        total = float(nll_sum.item())
        n = self.n_scored_tokens
        return PerplexityResult(
            perplexity=math.exp(total / n),
            nll_sum=total,
            n_scored_tokens=n,
            n_windows=len(self.plan),
            n_tokens=len(self.ids),
            context=self.context,
            stride=self.stride,
            batch_size=batch_size,
            batch_size_auto=self.auto_batch,
        )


def hf_recipe_perplexity(model: Any, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """Hugging Face's documented recipe, one window per forward pass, labels -100 outside each window's target
    and the model's own loss: the reference the batched evaluator is checked against (tests) and timed against
    (benchmarks/gpu/ppl_speed.py). The NLL sum stays on the device (no sync per window). Returns (perplexity,
    scored tokens)."""
    nll_sum = torch.zeros((), dtype=torch.float64, device=ids.device)
    n_scored, prev_end = 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        trg_len = end - prev_end
        window = ids[begin:end].unsqueeze(0)
        labels = window.clone()
        labels[:, :-trg_len] = -100
        valid = min(trg_len, end - begin - 1)
        if valid <= 0:  # a one-token tail window scores nothing (its loss is NaN)
            break
        with torch.inference_mode():
            loss = model(window, labels=labels).loss
        nll_sum += loss.double() * valid
        n_scored += valid
        prev_end = end
        if end == len(ids):
            break
    return math.exp(float(nll_sum) / n_scored), n_scored
