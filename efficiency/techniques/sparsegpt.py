"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774): one-shot pruning reconstructing each layer's output.

``sparsegptNN`` (unstructured NN%) and ``sparsegpt-2:4`` (2 of every 4 consecutive inputs kept per row).

For a linear layer with weight W (rows x cols) and calibration inputs X (cols x tokens) SparseGPT seeks a
masked W' minimising ||W X - W' X||^2. Its Hessian (the same for every row) is H = 2 X X^T; dampened
H + lambda I with lambda = ``damp`` * mean(diag H). With U the upper Cholesky factor of H^-1 (H^-1 = U^T U),
the columns are processed left to right in blocks of ``block_size`` (Algorithm 1 of the paper):

* mask selection, adaptive: at the start of each block (unstructured) or of each group of M columns (N:M) the
  weights with the smallest saliency w_c^2 / U_cc^2 (the OBS error w^2 / [H^-1]_cc of removing w) are pruned;
* OBS update: for column j, the error e = (w_j - m_j w_j) / U_jj is spread over the columns not yet processed,
  W[:, k] -= e U_jk for k > j (inside the block at once, to later blocks lazily as one matrix product).

The model is pruned block by block: the inputs of transformer block i are the outputs of the already-pruned
block i-1 (captured once in front of block 0 with a hook, then carried forward), and H of every linear layer
of a block is collected with forward hooks. The pruned weights are cached on disk (:func:`cached_build`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from efficiency.cache import cached_build
from efficiency.techniques.base import Context, TechniqueBase, UnsupportedTechnique, register
from efficiency.techniques.bnb import FilterFn
from efficiency.techniques.calibration import CalibrationSpec, calibration_ids, model_fingerprint
from efficiency.techniques.magnitude import (
    SparsityPattern,
    block_filter,
    decoder_layers,
    ensure_float_layer,
    is_linear,
    nm_keep,
    sparse_kernel_report,
    sparsity_report,
    unstructured_keep,
    weight_view,
)
from efficiency.techniques.progress import Progress

CACHE_FORMAT = 1  # bump when the algorithm changes, so stale cache entries are not reused


class HessianAccumulator:
    """Running H = (2 / N) sum_t x_t x_t^T over the N input rows x_t seen so far, in float32."""

    def __init__(self, cols: int, device: torch.device) -> None:
        self.hessian = torch.zeros(cols, cols, dtype=torch.float32, device=device)
        self.n_rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (t, cols)
        t = x.shape[0]
        self.hessian *= self.n_rows / (self.n_rows + t)
        self.n_rows += t
        x = x * math.sqrt(2.0 / self.n_rows)
        self.hessian += x.t() @ x


def _inverse_cholesky_upper(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """U with (H + lambda I)^-1 = U^T U, U upper triangular; lambda grows tenfold while H + lambda I is
    numerically singular."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diag = float(torch.diag(hessian).mean())
    for attempt in range(4):
        lam = damp * (10**attempt) * mean_diag
        lower, info = torch.linalg.cholesky_ex(hessian + lam * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0:
                return upper
    raise RuntimeError("SparseGPT: the Hessian stays singular after dampening")


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern,
                    block_size: int = 128, damp: float = 0.01) -> torch.Tensor:
    """The pruned copy of ``weight`` (rows, cols), float32, given H (cols, cols) of the layer's inputs.

    Unstructured: exactly ``round(p * rows * cols)`` zeros (each block prunes its share of a running total).
    Works on W^T so that a column of W is a contiguous row; the loop over columns is the paper's inner loop.
    """
    wt = weight.detach().float().t().contiguous()  # (cols, rows): wt[c] is input column c of W
    h = hessian.detach().float().clone()  # (cols, cols)
    cols, rows = wt.shape
    n, m = pattern.n, pattern.m
    if m is not None and cols % m:
        raise ValueError(f"{cols} input features are not a multiple of {m}")
    dead = torch.diag(h) == 0  # inputs that are always zero: their weights do nothing, prune them for free
    h[dead, dead] = 1.0
    wt[dead] = 0.0
    u = _inverse_cholesky_upper(h, damp)  # (cols, cols)
    u_diag = torch.diag(u)  # (cols,)
    keep = torch.ones_like(wt, dtype=torch.bool)  # (cols, rows)
    pruned_so_far = 0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block, ub, diag = wt[i1:i2], u[i1:i2, i1:i2], u_diag[i1:i2, None]  # (b, rows), (b, b), (b, 1)
        if n is None:  # unstructured: this block's share of the layer's round(p * numel) zeros
            target = round(pattern.sparsity * rows * i2)
            share = (target - pruned_so_far) / block.numel()
            keep[i1:i2] = unstructured_keep(block**2 / diag**2, share)  # saliency w^2 / [H^-1]_cc^2
            pruned_so_far = target
        scale = (~keep[i1:i2]).float() / diag  # (b, rows): e_j = w_j * scale_j is the OBS error of column j
        errors = torch.empty_like(block)  # (b, rows)
        for j in range(i2 - i1):
            if n is not None and m is not None and j % m == 0:  # N:M: choose the group's mask now
                saliency = (block[j : j + m] ** 2 / diag[j : j + m] ** 2).t()  # (rows, m)
                keep[i1 + j : i1 + j + m] = nm_keep(saliency, n, m).t()
                scale[j : j + m] = (~keep[i1 + j : i1 + j + m]).float() / diag[j : j + m]
            torch.mul(block[j], scale[j], out=errors[j])
            if j + 1 < i2 - i1:  # w_k -= e_j U_jk for the block's later columns k
                block[j + 1 :].addr_(ub[j, j + 1 :], errors[j], alpha=-1.0)
        wt[i2:].addmm_(u[i1:i2, i2:].t(), errors, alpha=-1.0)  # lazy update of all later columns
        block.mul_(keep[i1:i2])  # pruned weights become exact zeros, kept ones stay as updated
    return wt.t().contiguous()


# --------------------------------------------------------------------------- block-by-block calibration pass


class _Captured(Exception):
    """Raised by the hook in front of block 0 to stop the forward pass once its inputs are recorded."""


@dataclass
class BlockInput:
    """The arguments one transformer block was called with for one calibration batch."""

    hidden: torch.Tensor  # (B, L, d)
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def capture_block_inputs(model: nn.Module, first: nn.Module, ids: torch.Tensor, batch_size: int,
                         device: torch.device) -> list[BlockInput]:
    """Run the model on ``ids`` (n, L) up to block 0 and record what block 0 receives: hidden states plus the
    attention mask, position ids / rotary embeddings ... exactly as the model's own forward builds them."""
    records: list[BlockInput] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        records.append(BlockInput(hidden, tuple(args[1:]), kwargs))
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in ids.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return records


def run_block(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    out = block(inp.hidden, *inp.args, **inp.kwargs)
    return out[0] if isinstance(out, tuple) else out


class BlockHessians:
    """Forward hooks collecting H for every target layer of one block. Layers fed the very same input tensor
    (q/k/v, gate/up) share one accumulator: the sharing is found on the first batch, while each seen input is
    held, so no later tensor can reuse its memory and pass for it."""

    def __init__(self, targets: list[tuple[str, Any]]) -> None:
        self.acc: dict[str, HessianAccumulator] = {}
        self.owner: dict[str, str] = {}  # layer -> the layer whose accumulator it uses
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._handles = [mod.register_forward_hook(self._hook(full)) for full, mod in targets]

    def _hook(self, full: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0]
            if full not in self.owner:
                first = next((owner for seen, owner in self._seen if seen is x), None)
                self.owner[full] = first or full
                if first is None:
                    self.acc[full] = HessianAccumulator(x.shape[-1], x.device)
                    self._seen.append((x, full))
            if self.owner[full] == full:
                self.acc[full].add(x)

        return hook

    def end_batch(self) -> None:
        self._seen.clear()

    def hessian(self, full: str) -> torch.Tensor:
        return self.acc[self.owner[full]].hessian

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def solver_threads(device: torch.device) -> Iterator[None]:
    """One intra-op thread for the solver on CPU: its column loop is thousands of small sequential ops, where
    threads mostly add synchronisation. Measured on a 576 x 1536 layer: on a busy 2-core machine 2 threads
    were 5-50x slower than 1; on an idle 16-core one, 1 thread took 0.21 s, 4 threads 0.13 s, 16 0.15 s."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def prune_sequentially(model: nn.Module, ids: torch.Tensor, pattern: SparsityPattern, filter_fn: FilterFn, *,
                       device: torch.device, batch_size: int = 8, block_size: int = 128, damp: float = 0.01,
                       log: Callable[[str], None] | None = None, name: str = "sparsegpt") -> list[tuple[str, Any]]:
    """Prune ``model`` in place block by block; return the (name, layer) pairs that were pruned. ``log`` gets a
    progress line per block at most every few seconds (techniques/progress.py; the runner writes them to the
    terminal: tqdm on stderr, used before, was captured by pytest and showed nothing for minutes)."""
    prefix, blocks = decoder_layers(model)
    records = capture_block_inputs(model, blocks[0], ids, batch_size, device)
    pruned: list[tuple[str, Any]] = []
    progress = Progress(log, f"{name}: pruning", len(blocks), "blocks") if log is not None else None
    for index, block in enumerate(blocks):
        targets = [(f"{prefix}.{index}.{sub}", mod) for sub, mod in block.named_modules()
                   if sub and is_linear(mod) and filter_fn(mod, f"{prefix}.{index}.{sub}")]
        for full, mod in targets:
            ensure_float_layer(mod, full, name)
        hessians = BlockHessians(targets)
        try:
            for inp in records:
                run_block(block, inp)
                hessians.end_batch()
        finally:
            hessians.remove()
        with solver_threads(device):
            for full, mod in targets:
                weight = weight_view(mod)  # (out, in)
                if pattern.m is not None and weight.shape[1] % pattern.m:
                    continue
                weight.copy_(sparsegpt_prune(weight, hessians.hessian(full), pattern, block_size, damp))
                pruned.append((full, mod))
        del hessians
        for inp in records:  # the next block sees this pruned block's outputs
            inp.hidden = run_block(block, inp)
        if progress is not None:
            progress.update(index + 1)
    return pruned


# ----------------------------------------------------------------------------------------------- technique


@dataclass(frozen=True)
class SparseGPT(TechniqueBase):
    """One-shot OBS pruning with calibration text; ``n_sequences`` x ``seq_len`` calibration tokens."""

    pattern: SparsityPattern
    n_sequences: int = 32
    seq_len: int = 512
    batch_size: int = 8
    block_size: int = 128
    damp: float = 0.01
    semi_structured: bool = True  # 2:4: convert for PyTorch's sparse kernels where the device allows
    preserves_layer_shapes = True  # zeroed weights, the same layers

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.batch_size < 1 or not 0.0 < self.damp < 1.0:
            raise ValueError("block_size and batch_size must be >= 1 and damp in (0, 1)")
        if self.pattern.m is not None and self.block_size % self.pattern.m:
            raise ValueError(f"block_size {self.block_size} must be a multiple of M = {self.pattern.m}")
        CalibrationSpec(self.n_sequences, self.seq_len)  # validates

    @property
    def name(self) -> str:
        return f"sparsegpt-{self.pattern.label}" if self.pattern.is_nm else f"sparsegpt{self.pattern.label}"

    def check(self, ctx: Context) -> None:
        if ctx.calibration is None:
            hint = "--eff-calibration or --eff-data-dir"
            raise UnsupportedTechnique(f"{self.name} needs calibration text: pass {hint}")

    def apply(self, model: Any, ctx: Context, filter_fn: FilterFn | None = None) -> Any:
        self.check(ctx)
        device = torch.device(ctx.device)
        model = model.to(device)
        chosen = filter_fn or block_filter(model)
        ids, text_sha = calibration_ids(ctx, CalibrationSpec(self.n_sequences, self.seq_len, ctx.seed))
        parts = {
            "technique": self.name, "format": CACHE_FORMAT,
            "settings": {k: v for k, v in asdict(self).items() if k != "semi_structured"},  # not in the weights
            "model": ctx.model_name, "fingerprint": model_fingerprint(model),
            "dtype": str(next(model.parameters()).dtype), "device_type": device.type,
            "calibration_sha256": text_sha, "calibration_seed": ctx.seed,
            "filter": "blocks" if filter_fn is None else getattr(filter_fn, "__qualname__", repr(filter_fn)),
        }
        built: list[tuple[str, Any]] = []

        def build(folder: Path) -> None:
            from safetensors.torch import save_file

            built.extend(prune_sequentially(model, ids, self.pattern, chosen, device=device,
                                            batch_size=self.batch_size, block_size=self.block_size,
                                            damp=self.damp, log=ctx.say, name=self.name))
            weights = {name: mod.weight.data.contiguous() for name, mod in built}
            save_file(weights, str(folder / "weights.safetensors"))

        folder, hit = cached_build(ctx.cache_dir, "sparsegpt", parts, build)
        layers = built if not hit else _load_pruned(model, folder / "weights.safetensors", device, self.name)
        info: dict[str, Any] = {
            "pattern": self.pattern.label, "target_sparsity": self.pattern.target_sparsity,
            "calibration": {"n_sequences": self.n_sequences, "seq_len": self.seq_len, "sha256": text_sha},
            "block_size": self.block_size, "damp": self.damp, "cache": "hit" if hit else "miss",
            "cache_entry": str(folder), **sparsity_report(layers),
        }
        info.update(sparse_kernel_report(model, layers, ctx, self.pattern, self.semi_structured))
        ctx.info[self.name] = info
        return model


def _load_pruned(model: nn.Module, path: Path, device: torch.device, name: str) -> list[tuple[str, Any]]:
    from safetensors.torch import load_file

    layers: list[tuple[str, Any]] = []
    for layer_name, tensor in load_file(str(path), device=str(device)).items():
        module: Any = model.get_submodule(layer_name)
        ensure_float_layer(module, layer_name, name)
        module.weight.data.copy_(tensor)
        layers.append((layer_name, module))
    return layers


@register(r"sparsegpt(\d{2})|sparsegpt-([1-9]):([1-9])", "sparsegptNN | sparsegpt-2:4",
          examples=("sparsegpt50", "sparsegpt-2:4"))
def _sparsegpt(m: re.Match[str]) -> SparseGPT:
    return SparseGPT(SparsityPattern.from_suffix(m.group(1), m.group(2), m.group(3)))
