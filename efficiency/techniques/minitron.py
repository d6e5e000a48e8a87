"""Minitron structured pruning (Muralidharan et al., 2024, arXiv:2407.14679; Sreenivas et al., 2408.11796),
recovered by distillation from the unpruned model with the trainer of :mod:`efficiency.techniques.distil`.

``minitron-wNN`` removes NN% of the MLP neurons and NN% of the attention heads of every layer; ``-e``
(``minitron-wNN-e``) also removes NN% of the embedding (hidden) channels. ``minitron-dNN`` removes NN% of the
layers. Importance comes from activations on calibration windows (forward passes only):

    neuron i of layer l:   F_l(i) = mean over tokens of |a_i|, a = MLP intermediate (input of the down proj)
    head h of layer l:     F_l(h) = mean over tokens of ||o_h||_2, o_h = the head's attention output
    channel c:             F(c)   = sum over norms of mean over tokens of |LN(x)_c|   (LayerNorm / RMSNorm)
    layer l:               F(l)   = CE(model with layer l skipped) - CE(model), the layer made an identity

Each layer keeps the same count (configs hold one size for all layers), chosen per layer by importance.
Pruning yields real, smaller dense matrices and an updated config (``intermediate_size`` / ``n_inner`` /
``ffn_dim``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``hidden_size``,
``num_hidden_layers``), so the model saves, reloads and runs with a KV cache (layer_idx renumbered).

Heads and channels are pruned for Llama-style models only: GPT-2 and OPT derive head_dim = hidden / heads
from the config, so a checkpoint with fewer heads (or channels) could not be loaded back; for them
``minitron-wNN`` prunes MLP neurons and says so in the report. With grouped-query attention a layer either
drops whole KV groups or the same number of query heads inside every group, whichever lands closer to NN%.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from efficiency.techniques.base import Context, TechniqueBase, UnsupportedTechnique, register
from efficiency.techniques.bnb import is_conv1d
from efficiency.techniques.distil import KdSettings, distil_into
from efficiency.techniques.progress import Progress


@dataclass(frozen=True)
class Arch:
    """Where a family keeps its parts (paths relative to the model, or to a decoder layer)."""

    layers: str
    mlp_in: tuple[str, ...]  # output features = neurons
    mlp_out: str  # input features = neurons
    ffn_key: str  # config field of the MLP width
    attn_out: str  # input features = heads x head_dim
    qkv: tuple[str, str, str] | None = None  # separate q, k, v projections (None: no head pruning)
    norms: tuple[str, ...] = ()  # per-layer norms (channel importance and pruning)
    final_norm: str = ""


_LLAMA = Arch("model.layers", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size",
              "self_attn.o_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              ("input_layernorm", "post_attention_layernorm"), "model.norm")
ARCHS: dict[str, Arch] = {
    "gpt2": Arch("transformer.h", ("mlp.c_fc",), "mlp.c_proj", "n_inner", "attn.c_proj",
                 norms=("ln_1", "ln_2"), final_norm="transformer.ln_f"),
    "opt": Arch("model.decoder.layers", ("fc1",), "fc2", "ffn_dim", "self_attn.out_proj",
                norms=("self_attn_layer_norm", "final_layer_norm"),
                final_norm="model.decoder.final_layer_norm"),
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
}


def arch_of(model: Any) -> Arch:
    kind = getattr(model.config, "model_type", None)
    if kind not in ARCHS:
        raise UnsupportedTechnique(f"structured pruning knows {sorted(ARCHS)}, not model_type {kind!r}")
    return ARCHS[kind]


def decoder_layers(model: Any) -> nn.ModuleList:
    layers = model.get_submodule(arch_of(model).layers)
    assert isinstance(layers, nn.ModuleList)
    return layers


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)`` spread evenly, first and last included when k >= 2: round(i (n-1) / (k-1))."""
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n}")
    return [0] if k == 1 else [int(i * (n - 1) / (k - 1) + 0.5) for i in range(k)]


def _round(x: float) -> int:
    return int(x + 0.5)


# ------------------------------------------------------------------------------------------- surgery


def _data(module: nn.Module, name: str) -> torch.Tensor:
    value: torch.Tensor = getattr(module, name).data
    return value


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=getattr(module, name).requires_grad))


def select_outputs(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep output features ``keep``: rows of a Linear's W (out, in), columns of a Conv1D's W (in, out)."""
    w = _data(module, "weight")
    keep = keep.to(w.device)
    _replace(module, "weight", w[:, keep] if is_conv1d(module) else w[keep])
    if getattr(module, "bias", None) is not None:
        _replace(module, "bias", _data(module, "bias")[keep])
    setattr(module, "nf" if is_conv1d(module) else "out_features", len(keep))


def select_inputs(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep input features ``keep`` (the bias belongs to the outputs and stays)."""
    w = _data(module, "weight")
    keep = keep.to(w.device)
    _replace(module, "weight", w[keep] if is_conv1d(module) else w[:, keep])
    setattr(module, "nx" if is_conv1d(module) else "in_features", len(keep))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in their original order."""
    return torch.topk(scores.float(), k).indices.sort().values


def keep_layers(model: Any, keep: Sequence[int]) -> dict[str, Any]:
    """Keep decoder layers ``keep`` (in order); renumber ``layer_idx`` for the KV cache; fix the config."""
    arch, layers = arch_of(model), decoder_layers(model)
    n = len(layers)
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(kept):
        for sub in layer.modules():
            if hasattr(sub, "layer_idx"):
                setattr(sub, "layer_idx", new_idx)  # noqa: B010 (nn.Module attribute typing)
    parent, _, child = arch.layers.rpartition(".")
    setattr(model.get_submodule(parent), child, kept)
    model.config.num_hidden_layers = len(kept)
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n:
        model.config.layer_types = [layer_types[i] for i in keep]
    removed = [i for i in range(n) if i not in keep]
    return {"layers_before": n, "layers_kept": list(keep), "layers_removed": removed}


def mlp_weight_importance(model: Any) -> list[torch.Tensor]:
    """Per layer, neuron i: ||W_in[i, :]||_2 (summed over the input projections) * ||W_out[:, i]||_2."""
    arch, out = arch_of(model), []
    for layer in decoder_layers(model):
        w_in = torch.stack([_rows(layer.get_submodule(p)).norm(dim=1) for p in arch.mlp_in]).sum(0)
        out.append(w_in * _rows(layer.get_submodule(arch.mlp_out)).norm(dim=0))
    return out


def _rows(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whatever the layer type."""
    w = _data(module, "weight").float()
    return w.t() if is_conv1d(module) else w


def prune_mlp(model: Any, scores: Sequence[torch.Tensor], keep: int) -> dict[str, Any]:
    arch = arch_of(model)
    before = scores[0].numel()
    for layer, s in zip(decoder_layers(model), scores, strict=True):
        idx = _top(s, keep)
        for path in arch.mlp_in:
            select_outputs(layer.get_submodule(path), idx)
        select_inputs(layer.get_submodule(arch.mlp_out), idx)
    setattr(model.config, arch.ffn_key, keep)
    return {"neurons_before": before, "neurons_kept": keep}


def head_plan(heads: int, groups: int, remove: float, hidden: int) -> tuple[str, int, int]:
    """(mode, kv groups kept, query heads kept per group) whose head count is closest to removing ``remove``
    of the heads: "groups" drops whole KV groups, "queries" drops query heads inside every group. Only counts
    that divide ``hidden`` qualify (transformers' Llama config insists on it). Ties keep more heads, then
    prefer "groups", which also shrinks the KV cache."""
    rep = heads // groups
    target = heads * (1.0 - remove)
    options = [(kg * rep, "groups", kg, rep) for kg in range(1, groups + 1)]
    options += [(groups * q, "queries", groups, q) for q in range(1, rep + 1)]
    feasible = [o for o in options if hidden % o[0] == 0]
    best = min(feasible, key=lambda o: (abs(o[0] - target), -o[0], o[1] != "groups"))
    return best[1], best[2], best[3]


def _head_rows(heads: Sequence[int], dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * dim, (h + 1) * dim) for h in heads])


def prune_heads(model: Any, scores: Sequence[torch.Tensor], remove: float) -> dict[str, Any]:
    """Remove ``remove`` of the query heads per layer (Llama-style; see :func:`head_plan`)."""
    arch, cfg = arch_of(model), model.config
    if arch.qkv is None:
        return {"pruned": False, "reason": f"{cfg.model_type} derives head_dim from hidden_size / heads, so "
                "a checkpoint with fewer heads could not be reloaded; heads kept"}
    heads, groups = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rep = heads // groups
    mode, kept_groups, per_group = head_plan(heads, groups, remove, cfg.hidden_size)
    if kept_groups * per_group == heads:
        return {"pruned": False, "heads_before": heads, "reason": f"removing {remove:.0%} of {heads} heads "
                f"in {groups} KV groups rounds to none (the head count must divide hidden_size)"}
    for layer, s in zip(decoder_layers(model), scores, strict=True):
        by_group = s.float().view(groups, rep)  # (groups, rep)
        if mode == "groups":
            kv = _top(by_group.sum(1), kept_groups).tolist()
            q = [g * rep + r for g in kv for r in range(rep)]
        else:
            kv = list(range(groups))
            q = [g * rep + r for g in kv for r in _top(by_group[g], per_group).tolist()]
        q_proj, k_proj, v_proj = (layer.get_submodule(p) for p in arch.qkv)
        select_outputs(q_proj, _head_rows(q, dim))
        select_outputs(k_proj, _head_rows(kv, dim))
        select_outputs(v_proj, _head_rows(kv, dim))
        select_inputs(layer.get_submodule(arch.attn_out), _head_rows(q, dim))
        attn = layer.get_submodule(arch.attn_out.rpartition(".")[0])
        setattr(attn, "num_key_value_groups", len(q) // len(kv))  # noqa: B010
    cfg.head_dim = dim
    cfg.num_attention_heads = kept_groups * per_group
    cfg.num_key_value_heads = kept_groups
    return {"pruned": True, "mode": mode, "heads_before": heads, "heads_kept": cfg.num_attention_heads,
            "kv_heads_before": groups, "kv_heads_kept": kept_groups}


def prune_channels(model: Any, scores: torch.Tensor, keep: int) -> dict[str, Any]:
    """Keep ``keep`` hidden channels everywhere the residual stream is read or written (Llama-style)."""
    arch, cfg = arch_of(model), model.config
    if arch.qkv is None:
        return {"pruned": False, "reason": f"{cfg.model_type}: head_dim is tied to hidden_size; kept"}
    if keep % cfg.num_attention_heads:
        raise ValueError(f"{keep} channels: transformers needs a multiple of {cfg.num_attention_heads} heads")
    idx = _top(scores, keep)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    _replace(embed, "weight", _data(embed, "weight")[:, idx.to(embed.weight.device)])
    embed.embedding_dim = keep
    norms = [model.get_submodule(arch.final_norm)]
    for layer in decoder_layers(model):
        norms += [layer.get_submodule(p) for p in arch.norms]
        for path in (*arch.qkv, *arch.mlp_in):
            select_inputs(layer.get_submodule(path), idx)
        for path in (arch.attn_out, arch.mlp_out):
            select_outputs(layer.get_submodule(path), idx)
    for norm in norms:
        select_weight_vector(norm, idx)
    if head is not None:
        if tied:
            head.weight = embed.weight
            head.in_features = keep
        else:
            select_inputs(head, idx)
    before = cfg.hidden_size
    cfg.head_dim = getattr(cfg, "head_dim", None) or before // cfg.num_attention_heads
    cfg.hidden_size = keep
    return {"pruned": True, "channels_before": before, "channels_kept": keep}


def select_weight_vector(norm: nn.Module, idx: torch.Tensor) -> None:
    """Keep channels ``idx`` of a LayerNorm / RMSNorm (weight, bias, normalized_shape)."""
    weight = _data(norm, "weight")
    _replace(norm, "weight", weight[idx.to(weight.device)])
    if getattr(norm, "bias", None) is not None:
        _replace(norm, "bias", _data(norm, "bias")[idx.to(weight.device)])
    if hasattr(norm, "normalized_shape"):
        setattr(norm, "normalized_shape", (len(idx),))  # noqa: B010


# ---------------------------------------------------------------------------------------- importance


@dataclass
class WidthImportance:
    neurons: list[torch.Tensor]  # per layer, (intermediate,)
    heads: list[torch.Tensor]  # per layer, (num_attention_heads,)
    channels: torch.Tensor  # (hidden,)
    n_tokens: int


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(..., features) -> (tokens, features) in float32 (OPT flattens batch and sequence in its layers)."""
    return x.float().reshape(-1, x.size(-1))


def _batches(ids: torch.Tensor, batch: int, device: str) -> list[torch.Tensor]:
    return [ids[i : i + batch].to(device) for i in range(0, len(ids), batch)]


@torch.inference_mode()
def width_importance(model: Any, ids: torch.Tensor, device: str, batch: int = 4) -> WidthImportance:
    """Activation statistics of the module docstring over calibration windows ``ids`` (n, L)."""
    arch, cfg = arch_of(model), model.config
    layers = decoder_layers(model)
    heads = cfg.num_attention_heads
    neurons: list[torch.Tensor] = [torch.zeros(0)] * len(layers)
    head_norm: list[torch.Tensor] = [torch.zeros(0)] * len(layers)
    channels: list[torch.Tensor] = []
    handles = []

    def on_mlp(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            a = _flat(args[0]).abs().sum(0)  # (intermediate,)
            neurons[i] = a if neurons[i].numel() == 0 else neurons[i] + a
        return hook

    def on_attn(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = _flat(args[0])  # (tokens, heads * head_dim)
            n = x.view(len(x), heads, -1).norm(dim=-1).sum(0)  # (heads,)
            head_norm[i] = n if head_norm[i].numel() == 0 else head_norm[i] + n
        return hook

    def on_norm(_m: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> None:
        channels.append(_flat(out).abs().sum(0))  # (hidden,)

    for i, layer in enumerate(layers):
        handles.append(layer.get_submodule(arch.mlp_out).register_forward_pre_hook(on_mlp(i)))
        handles.append(layer.get_submodule(arch.attn_out).register_forward_pre_hook(on_attn(i)))
        handles += [layer.get_submodule(p).register_forward_hook(on_norm) for p in arch.norms]
    handles.append(model.get_submodule(arch.final_norm).register_forward_hook(on_norm))
    try:
        for b in _batches(ids, batch, device):
            model(b, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n_tokens = ids.numel()
    return WidthImportance([x.cpu() / n_tokens for x in neurons], [x.cpu() / n_tokens for x in head_norm],
                           torch.stack(channels).sum(0).cpu() / n_tokens, n_tokens)


def _mean_loss(model: Any, ids: torch.Tensor, device: str, batch: int) -> float:
    losses = [float(model(b, labels=b, use_cache=False).loss) * len(b) for b in _batches(ids, batch, device)]
    return sum(losses) / len(ids)


@torch.inference_mode()
def layer_importance(
    model: Any, ids: torch.Tensor, device: str, batch: int = 4, progress: Progress | None = None
) -> torch.Tensor:
    """(n_layers,) increase of the mean calibration CE when each layer alone is replaced by the identity."""

    def identity(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    base = _mean_loss(model, ids, device, batch)
    scores = []
    for layer in decoder_layers(model):
        handle = layer.register_forward_hook(identity, with_kwargs=True)
        try:
            scores.append(_mean_loss(model, ids, device, batch) - base)
        finally:
            handle.remove()
        if progress is not None:
            progress.update(len(scores))
    return torch.tensor(scores)


# ------------------------------------------------------------------------------------------- technique


@dataclass(frozen=True)
class Minitron(TechniqueBase):
    """``axis`` "w" (width) or "d" (depth); ``remove_pct``% removed; ``embedding`` adds hidden channels."""

    axis: str
    remove_pct: int
    embedding: bool = False
    settings: KdSettings = KdSettings()
    importance_sequences: int = 32

    def __post_init__(self) -> None:
        if self.axis not in ("w", "d") or not 0 < self.remove_pct < 100 or self.importance_sequences < 1:
            raise ValueError(f"bad minitron: {self.axis}, {self.remove_pct}, {self.importance_sequences}")
        if self.embedding and self.axis != "w":
            raise ValueError("embedding channels are a width axis")

    @property
    def name(self) -> str:
        return f"minitron-{self.axis}{self.remove_pct}" + ("-e" if self.embedding else "")

    def make_student(
        self, model: Any, train: torch.Tensor, device: str, log: Callable[[str], None] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Prune ``model`` (a copy of the teacher) in place; importance from the first ``train`` windows."""
        return model, self._prune(model, train, device, log or (lambda _msg: None))

    def _prune(self, model: Any, train: torch.Tensor, device: str, log: Callable[[str], None]) -> dict[str, Any]:
        calib = train[: self.importance_sequences]
        frac = self.remove_pct / 100
        info: dict[str, Any] = {"importance_tokens": calib.numel()}
        if self.axis == "d":
            n_layers = len(decoder_layers(model))
            log(f"{self.name}: calibration, layer importance over {calib.numel()} tokens ({n_layers + 1} passes)")
            progress = Progress(log, f"{self.name}: calibration", n_layers, "layers")
            scores = layer_importance(model, calib, device, progress=progress)
            n = len(scores)
            kept = max(1, n - _round(n * frac))
            keep = sorted(torch.topk(scores, kept).indices.tolist())
            return {**info, "importance": "calibration CE increase when the layer is skipped",
                    "layer_ce_increase": [round(float(s), 6) for s in scores], **keep_layers(model, keep)}
        log(f"{self.name}: calibration, activation statistics over {calib.numel()} tokens")
        imp = width_importance(model, calib, device)
        info["importance"] = "mean |MLP activation|, mean head-output L2 norm, mean |norm output| per channel"
        width = imp.neurons[0].numel()
        info["mlp"] = prune_mlp(model, imp.neurons, max(1, width - _round(width * frac)))
        info["heads"] = prune_heads(model, imp.heads, frac)
        if self.embedding:
            hidden = imp.channels.numel()
            heads = model.config.num_attention_heads  # the kept width must stay a multiple of the head count
            n_channels = max(heads, (hidden - _round(hidden * frac)) // heads * heads)
            info["channels"] = prune_channels(model, imp.channels, n_channels)
        return info

    def apply(self, model: Any, ctx: Context) -> Any:
        arch_of(model)  # unsupported families skip before any work
        structure = {"axis": self.axis, "remove_pct": self.remove_pct, "embedding": self.embedding,
                     "importance_sequences": self.importance_sequences}
        return distil_into(model, ctx, name=self.name, kind="minitron", settings=self.settings,
                           structure=structure,
                           make_student=lambda student, train: self.make_student(student, train, ctx.device,
                                                                                  ctx.say))


@register(r"minitron-w(\d{1,2})(-e)?", "minitron-wNN[-e] (remove NN% of neurons and heads[, channels])",
          examples=("minitron-w25", "minitron-w50-e", "minitron-w5"))
def _minitron_w(m: re.Match[str]) -> Minitron:
    return Minitron("w", int(m.group(1)), embedding=bool(m.group(2)))


@register(r"minitron-d(\d{1,2})", "minitron-dNN (remove NN% of the layers)",
          examples=("minitron-d50", "minitron-d25"))
def _minitron_d(m: re.Match[str]) -> Minitron:
    return Minitron("d", int(m.group(1)))
