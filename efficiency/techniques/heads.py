"""Attention-head pruning ``ahNN``: remove the heads whose attention is most concentrated (threshold NN/100).

Score (per head h, on calibration text): concentration(h) = mean over sequences b and query positions q of
max_k A[b, h, q, k], where A are the head's attention probabilities. A head that always puts nearly all its
weight on one token (often the first token, an "attention sink") scores near 1 and contributes little beyond a
fixed vector; heads with score >= threshold are removed, keeping at least one head per layer (the least
concentrated one).

Removal is physical, so parameters and FLOPs drop: the query/key/value rows and the output-projection columns
of a removed head are cut out and the attention module's head counts updated:

* GPT-2: fused ``c_attn`` Conv1D (d, 3 S) and ``c_proj`` Conv1D (S, d), S = ``split_size`` = heads x head_dim;
* OPT: ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` and ``num_heads``;
* Llama-style grouped-query attention: query heads are removed inside their key/value group and a KV head
  goes when its whole group goes. The attention code repeats each KV head ``num_key_value_groups`` (= r) times
  for consecutive query heads, so r becomes the gcd of the surviving group sizes; where the groups are uneven
  (e.g. 3 and 2), :class:`HeadGather` repeats the computed KV heads after ``k_proj`` / ``v_proj`` (rotary
  embeddings act on each head alike, so repeating before or after them is the same).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from efficiency.techniques.base import Context, TechniqueBase, UnsupportedTechnique, register
from efficiency.techniques.bnb import is_conv1d
from efficiency.techniques.calibration import CalibrationSpec, calibration_ids
from efficiency.techniques.magnitude import decoder_layers, ensure_float_layer

# ----------------------------------------------------------------------------------------------- scoring


def concentration_scores(probs: torch.Tensor) -> torch.Tensor:
    """Attention probabilities (B, H, Q, K) -> (H,): mean over b and q of max_k probs[b, h, q, k]."""
    return probs.detach().amax(dim=-1).double().mean(dim=(0, 2))


def select_heads(scores: Sequence[torch.Tensor], threshold: float) -> list[list[int]]:
    """Per layer, the heads with score >= threshold, sparing the lowest-scoring head if all would go."""
    remove: list[list[int]] = []
    for layer_scores in scores:
        chosen = [h for h, s in enumerate(layer_scores.tolist()) if s >= threshold]
        if len(chosen) == len(layer_scores):
            chosen.remove(int(torch.argmin(layer_scores)))
        remove.append(chosen)
    return remove


def attention_modules(model: nn.Module) -> list[Any]:
    """The self-attention module of every transformer block (``self_attn`` or GPT-2's ``attn``)."""
    _, blocks = decoder_layers(model)
    modules = []
    for block in blocks:
        attn = getattr(block, "self_attn", None) or getattr(block, "attn", None)
        if attn is None:
            raise UnsupportedTechnique(f"{type(block).__name__} has no self_attn / attn module")
        modules.append(attn)
    return modules


@torch.no_grad()
def head_scores(model: Any, ids: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Concentration of every head of every layer on ``ids`` (n, L): a list of (H_layer,) float64 tensors.

    Runs with eager attention (the only kind that materialises probabilities) and reads the weights each
    attention module returns with a forward hook, reducing them at once instead of keeping every layer's
    (B, H, L, L)."""
    modules = attention_modules(model)
    sums: list[torch.Tensor | None] = [None] * len(modules)
    device = next(model.parameters()).device

    def make_hook(index: int) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if probs is None:
                raise RuntimeError("the attention module returned no probabilities under eager attention")
            total = concentration_scores(probs) * probs.shape[0]
            prev = sums[index]
            sums[index] = total if prev is None else prev + total

        return hook

    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    handles = [mod.register_forward_hook(make_hook(i)) for i, mod in enumerate(modules)]
    try:
        for batch in ids.split(batch_size):
            model(batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous)
    return [(s if s is not None else torch.zeros(0)).cpu() / len(ids) for s in sums]


# ------------------------------------------------------------------------------------------------ surgery


class HeadGather(nn.Module):
    """A key/value projection followed by repeating its heads: y = proj(x) viewed as (..., G, head_dim),
    then heads ``index`` (length G', values in [0, G)) taken in order. Lets uneven GQA groups share the
    attention code that repeats every KV head the same number of times."""

    index: torch.Tensor  # (G',) which computed KV head each repeated head copies

    def __init__(self, proj: Any, index: torch.Tensor, head_dim: int) -> None:
        super().__init__()
        self.proj = proj
        self.head_dim = head_dim
        self.register_buffer("index", index.long())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)  # (..., G * hd)
        heads = y.view(*y.shape[:-1], -1, self.head_dim).index_select(-2, self.index)  # (..., G', hd)
        return heads.flatten(-2)


def _rows(heads: Sequence[int], head_dim: int, offset: int = 0) -> torch.Tensor:
    return torch.tensor([offset + h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long)


def _slice_linear(module: Any, out_idx: torch.Tensor | None = None,
                  in_idx: torch.Tensor | None = None) -> None:
    """Keep rows ``out_idx`` / columns ``in_idx`` of a Linear or Conv1D (weights as (out, in)), in place."""
    conv = is_conv1d(module)
    weight = module.weight.data.t() if conv else module.weight.data  # (out, in)
    dev = weight.device
    if out_idx is not None:
        weight = weight.index_select(0, out_idx.to(dev))
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.data.index_select(0, out_idx.to(dev)).clone(),
                                       requires_grad=module.bias.requires_grad)
    if in_idx is not None:
        weight = weight.index_select(1, in_idx.to(dev))
    out_f, in_f = weight.shape
    grad = module.weight.requires_grad
    module.weight = nn.Parameter((weight.t() if conv else weight).contiguous(), requires_grad=grad)
    if conv:
        module.nf, module.nx = out_f, in_f
    else:
        module.out_features, module.in_features = out_f, in_f


def _num_heads(attn: Any) -> int:
    if hasattr(attn, "c_attn"):
        return int(attn.num_heads)
    return int(attn.q_proj.weight.shape[0] // attn.head_dim)


def _kv_index(attn: Any, n_query: int) -> list[int]:
    """For every current query head, the computed KV head it reads (0..G-1)."""
    groups = int(getattr(attn, "num_key_value_groups", 1))
    gather = attn.k_proj.index.tolist() if isinstance(attn.k_proj, HeadGather) else None
    return [gather[q // groups] if gather is not None else q // groups for q in range(n_query)]


def _prune_gqa(attn: Any, keep: list[int]) -> dict[str, int]:
    hd = attn.head_dim
    n_query = _num_heads(attn)
    kv_of = _kv_index(attn, n_query)
    k_lin = attn.k_proj.proj if isinstance(attn.k_proj, HeadGather) else attn.k_proj
    v_lin = attn.v_proj.proj if isinstance(attn.v_proj, HeadGather) else attn.v_proj
    kv_kept = sorted({kv_of[q] for q in keep})
    counts = [sum(1 for q in keep if kv_of[q] == g) for g in kv_kept]
    r = math.gcd(*counts)
    renumber = {g: i for i, g in enumerate(kv_kept)}
    index = [renumber[g] for g, c in zip(kv_kept, counts, strict=True) for _ in range(c // r)]
    _slice_linear(attn.q_proj, out_idx=_rows(keep, hd))
    _slice_linear(attn.o_proj, in_idx=_rows(keep, hd))
    for proj_name, lin in (("k_proj", k_lin), ("v_proj", v_lin)):
        _slice_linear(lin, out_idx=_rows(kv_kept, hd))
        uneven = index != list(range(len(kv_kept)))
        gathered = HeadGather(lin, torch.tensor(index, device=lin.weight.device), hd) if uneven else lin
        setattr(attn, proj_name, gathered)
    attn.num_key_value_groups = r
    return {"kv_heads": len(kv_kept), "kv_heads_repeated": len(index), "kv_groups": r}


def _projections(attn: Any) -> dict[str, nn.Module]:
    """The head-carrying layers of an attention module (inner layers of :class:`HeadGather` wrappers)."""
    if hasattr(attn, "c_attn"):  # GPT-2: fused q|k|v Conv1D
        layers = {"c_attn": attn.c_attn, "c_proj": attn.c_proj}
    else:
        out = "out_proj" if hasattr(attn, "out_proj") else "o_proj"
        layers = {p: getattr(attn, p, None) for p in ("q_proj", "k_proj", "v_proj", out)}
        if any(layer is None for layer in layers.values()) or not hasattr(attn, "head_dim"):
            raise UnsupportedTechnique(f"{type(attn).__name__} has no q/k/v/out projections this code knows")
    return {k: v.proj if isinstance(v, HeadGather) else v for k, v in layers.items()}


def check_prunable(model: nn.Module, technique: str) -> None:
    """Raise :class:`UnsupportedTechnique` unless every attention module has float q/k/v/out layers."""
    for index, attn in enumerate(attention_modules(model)):
        for label, layer in _projections(attn).items():
            ensure_float_layer(layer, f"{index}.{label}", technique)


def _prune_one(attn: Any, keep: list[int]) -> dict[str, int]:
    if hasattr(attn, "c_attn"):  # GPT-2: the columns of q, k and v are three sections of c_attn
        hd, split = attn.head_dim, attn.split_size
        qkv = torch.cat([_rows(keep, hd, offset=s * split) for s in range(3)])
        _slice_linear(attn.c_attn, out_idx=qkv)
        _slice_linear(attn.c_proj, in_idx=_rows(keep, hd))
        attn.split_size = len(keep) * hd
        attn.num_heads = len(keep)
        return {}
    if hasattr(attn, "o_proj"):  # Llama family, possibly grouped-query
        return _prune_gqa(attn, keep)
    rows = _rows(keep, attn.head_dim)  # OPT: one key/value head per query head
    for proj in ("q_proj", "k_proj", "v_proj"):
        _slice_linear(getattr(attn, proj), out_idx=rows)
    _slice_linear(attn.out_proj, in_idx=rows)
    attn.num_heads = len(keep)
    return {}


@torch.no_grad()
def prune_heads(model: nn.Module, remove: Sequence[Sequence[int]], name: str = "ah") -> list[dict[str, Any]]:
    """Cut out the heads ``remove[layer]`` (indices of the layer's current heads); report per layer."""
    check_prunable(model, name)
    modules = attention_modules(model)
    if len(remove) != len(modules):
        raise ValueError(f"{len(remove)} layers of heads given for {len(modules)} attention modules")
    report = []
    for index, (attn, gone) in enumerate(zip(modules, remove, strict=True)):
        before = _num_heads(attn)
        keep = [h for h in range(before) if h not in set(gone)]
        if not keep:
            raise ValueError(f"layer {index}: every head would be removed; keep at least one")
        extra = _prune_one(attn, keep) if len(keep) < before else {}
        report.append({"layer": index, "removed": sorted(set(gone)), "heads_before": before,
                       "heads_after": len(keep), **extra})
    return report


@torch.no_grad()
def zero_heads(model: nn.Module, remove: Sequence[Sequence[int]]) -> None:
    """The soft equivalent of :func:`prune_heads` (same outputs, same shapes): zero the output projection's
    input columns of the heads, so they contribute nothing. Used as the test oracle and for ablations."""
    for attn, gone in zip(attention_modules(model), remove, strict=True):
        hd = attn.head_dim
        cols = _rows(sorted(set(gone)), hd)
        if hasattr(attn, "c_proj"):
            attn.c_proj.weight.data[cols.to(attn.c_proj.weight.device), :] = 0  # Conv1D (in, out)
        else:
            out = attn.out_proj if hasattr(attn, "out_proj") else attn.o_proj
            out.weight.data[:, cols.to(out.weight.device)] = 0


# ----------------------------------------------------------------------------------------------- technique


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class HeadPruning(TechniqueBase):
    """Remove heads with concentration >= ``threshold``, scored on ``n_sequences`` x ``seq_len`` tokens."""

    threshold: float
    n_sequences: int = 16
    seq_len: int = 256
    batch_size: int = 4

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        CalibrationSpec(self.n_sequences, self.seq_len)  # validates

    @property
    def name(self) -> str:
        return f"ah{round(self.threshold * 100):02d}"

    def check(self, ctx: Context) -> None:
        if ctx.calibration is None:
            hint = "--eff-calibration or --eff-data-dir"
            raise UnsupportedTechnique(f"{self.name} needs calibration text: pass {hint}")

    def apply(self, model: Any, ctx: Context) -> Any:
        self.check(ctx)
        check_prunable(model, self.name)
        model = model.to(torch.device(ctx.device))
        ids, text_sha = calibration_ids(ctx, CalibrationSpec(self.n_sequences, self.seq_len, ctx.seed))
        scores = head_scores(model, ids, self.batch_size)
        remove = select_heads(scores, self.threshold)
        params_before = _n_params(model)
        layers = prune_heads(model, remove, self.name)
        for layer, layer_scores in zip(layers, scores, strict=True):
            layer["scores"] = [round(s, 4) for s in layer_scores.tolist()]
        ctx.info[self.name] = {
            "threshold": self.threshold,
            "score": "mean over queries of the largest attention probability (concentration)",
            "calibration": {"n_sequences": self.n_sequences, "seq_len": self.seq_len, "sha256": text_sha},
            "heads_removed": sum(len(r) for r in remove),
            "heads_before": sum(layer["heads_before"] for layer in layers),
            "heads_removed_per_layer": [len(r) for r in remove],
            "layers": layers,
            "params_before": params_before,
            "params_after": _n_params(model),
        }
        return model


@register(r"ah(\d{2})", "ahNN (e.g. ah90: remove heads with concentration >= 0.90)",
          examples=("ah90", "ah50", "ah05"))
def _heads(m: re.Match[str]) -> HeadPruning:
    return HeadPruning(int(m.group(1)) / 100)
