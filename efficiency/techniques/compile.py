"""Compiled execution: ``compile``, the last step of a pipeline (``bf16+compile``, ``int4wo+compile``).

What a deployment runs instead of eager Hugging Face passes:

- **decode**: a static KV cache (one per batch size and cache-length bucket, reset before each call, so its
  tensors keep their addresses) and a greedy loop whose one-token step is ``torch.compile``d with CUDA graphs
  on a GPU (``options={"triton.cudagraphs": True}``, what ``mode="reduce-overhead"`` sets). The loop replaces
  ``model.generate`` only for the calls the latency and serving phases make (greedy, no padding,
  ``min_new_tokens == max_new_tokens``, optionally a streamer, fed as ``generate`` feeds it); any other call goes
  to Hugging Face's ``generate`` unchanged. The prompt's prefill runs eagerly into the static cache
  (:meth:`CompiledExecution.prefill`), then the steps (:meth:`CompiledExecution.decode`, which the decode phase
  times alone). The tokens equal Hugging Face's greedy ``generate`` (tests/techniques/test_compile.py).
- **forward without cache** (the perplexity pass, prefill latency): regional compilation, each decoder block
  compiled (``dynamic=False``); the blocks share one compiled graph per input shape, so compiling costs one
  block's time, not the whole model's, per shape (PyTorch's recipe for repeated blocks). The LM head is a region
  of its own, so that inductor pads a vocabulary whose size breaks the tensor cores' alignment.
  An earlier step can ask for these passes to stay eager (``EAGER_PASSES_KEY`` in its report entry, with the
  reason, which the report repeats): int8wo on a GPU (and in bf16 on the CPU), whose matmul inductor lowers to a
  kernel that is slower over many rows.
- **plain weights** (``unwrap_subclasses``, on): torchao's quantised weights (tensor subclasses) reach the compiled
  graphs as their plain inner tensors (techniques/unwrap.py); otherwise each compiled call flattens every subclass
  weight in Python, a decode step takes them all, and the host, not the GPU, set its pace.
- **bias and activation in the matmul's epilogue** (``fuse_bias_activation``, on): OPT's ``fc1`` + ReLU and
  GPT-2's ``c_fc`` + tanh-GELU (on a GPU) become one ``torch._addmm_activation`` (techniques/epilogue.py).
- **fused projections** (``fuse_projections``, on): before the first quantisation step (else before this one)
  the projections that read one input (q/k/v, gate/up) become one linear layer (techniques/fusion.py).
- **layer norms as persistent reductions** (``multi_kernel``, on, GPU only): in the passes, inductor compiles each
  reduction both ways and runs the faster (a norm over more than 1,024 features is otherwise a looped kernel that
  reads its input twice).
- **fewer gaps between kernels on a GPU**: the decode step's independent small kernels launched as one
  (``combo_kernels``, on), and inductor's Triton kernels launched before the kernel they depend on ends, waiting
  for it on the GPU (programmatic dependent launch, ``pdl``, on; compute capability 9.0 and later, where the
  report says why not elsewhere).

Compilation happens at the first call of each shape, which the phases make in their untimed setup (warm-up); the
report gives it as each phase's ``setup_s``. The static cache's length is the prompt plus the new tokens rounded
up to ``cache_bucket`` tokens, so the lengths the latency phases use (1, 2, N new tokens) share one cache and one
compiled step. Models holding bitsandbytes layers are not compiled (their kernels break the graph): the case is
skipped with the reason.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import shutil
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from efficiency.config import ConfigError
from efficiency.models import cache_argument, max_positions
from efficiency.techniques.base import Context, TechniqueBase, UnsupportedTechnique, declared_by_steps, register
from efficiency.techniques.epilogue import fuse_bias_activations
from efficiency.techniques.unwrap import unwrap_weight_subclasses

CACHE_BUCKET_TOKENS = 256
PDL_OPTION = "triton.enable_pdl"
MULTI_KERNEL_OPTION = "triton.multi_kernel"
PDL_MIN_CAPABILITY = (9, 0)  # Hopper: inductor emits PDL code from compute capability 9.0 on, none before


def inductor_options(cuda_graphs: bool, coordinate_descent_tuning: bool, max_autotune: bool,
                     freezing: bool, combo_kernels: bool = False, pdl: bool = False,
                     multi_kernel: bool = False) -> dict[str, Any]:
    """The inductor settings of one ``torch.compile`` call (``options=``; ``mode="reduce-overhead"`` is
    ``{"triton.cudagraphs": True}`` and ``mode="max-autotune"`` adds ``max_autotune``). ``freezing`` treats the
    weights as constants of the graph (inference only); ``combo_kernels`` launches independent small Triton
    kernels (a layer's key and value cache writes, say) as one; ``pdl`` launches inductor's Triton kernels with
    programmatic dependent launch (named only when on: a torch without the setting refuses its name);
    ``multi_kernel`` compiles each reduction both as a persistent and as a looped Triton kernel, the faster run
    (named only when on)."""
    options: dict[str, Any] = {"triton.cudagraphs": cuda_graphs, "coordinate_descent_tuning": coordinate_descent_tuning,
                               "max_autotune": max_autotune, "freezing": freezing, "combo_kernels": combo_kernels}
    if pdl:
        options[PDL_OPTION] = True
    if multi_kernel:
        options[MULTI_KERNEL_OPTION] = 1
    return options


def pdl_unavailable(ctx: Context) -> str | None:
    """Why programmatic dependent launch cannot apply to a case's compiled graphs, None when it can: a CUDA device
    of compute capability 9.0 or later (where inductor emits it) and a torch whose inductor has the setting."""
    import torch._inductor.config as inductor_config

    if not ctx.is_cuda:
        return "a CUDA feature (the launch of a kernel before the one it depends on ends), not on this device"
    if not hasattr(inductor_config.triton, "enable_pdl"):
        return f"torch {torch.__version__}'s inductor has no {PDL_OPTION}"
    if torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(torch.device(ctx.device))
        if capability < PDL_MIN_CAPABILITY:
            return (f"compute capability {capability[0]}.{capability[1]}: inductor emits it from "
                    f"{PDL_MIN_CAPABILITY[0]}.{PDL_MIN_CAPABILITY[1]} (Hopper) on")
    return None


# What a step applied before ``compile`` asks of it, in the step's report entry (so that the report shows it):
INDUCTOR_OPTIONS_KEY = "inductor_options_asked"  # the inductor settings its kernels need
EAGER_PASSES_KEY = "eager_passes_asked"  # why passes without cache (perplexity, prefill) must stay eager
MIN_DECODE_BATCH_KEY = "compiled_decode_min_batch"  # [smallest batch, why]: the compiled decode step fails below it


def inductor_options_asked(info: dict[str, Any]) -> dict[str, Any]:
    """The inductor settings that the steps applied before ``compile`` ask for, merged in order. A quantiser asks
    instead of setting inductor's process-wide config, so that one case's settings never leak into the next case
    of the session."""
    return {k: v for options in declared_by_steps(info, INDUCTOR_OPTIONS_KEY) for k, v in options.items()}


def eager_passes_asked(info: dict[str, Any]) -> str | None:
    """Why the steps applied before ``compile`` ask that passes without cache run eagerly, None when none asks: a
    quantiser whose matmul inductor lowers to a slower kernel than its eager path."""
    return "; ".join(declared_by_steps(info, EAGER_PASSES_KEY)) or None


def min_decode_batch_asked(info: dict[str, Any]) -> tuple[int, str] | None:
    """The smallest batch the compiled decode step can run at, by what the earlier steps ask
    (``MIN_DECODE_BATCH_KEY``), with their reasons; None: any batch."""
    asks = declared_by_steps(info, MIN_DECODE_BATCH_KEY)
    if not asks:
        return None
    return max(int(batch) for batch, _ in asks), "; ".join(why for _, why in asks)


class CompiledDecodeRefused(UnsupportedTechnique):
    """The compiled decode step cannot run at this batch (an earlier step said so, before anything compiles)."""


# Static shapes one compiled function may take within a case (perplexity batches, prefill, first token, the decode
# step at each serving batch size); each is compiled in untimed setup. Past it the case fails: dynamo's default is
# to warn in the log and run the function eagerly, which measured eager code under a "+compile" label
# (docs/results.md section 5g).
RECOMPILE_LIMIT = 32


def compiled_case_settings() -> AbstractContextManager[Any]:
    """Dynamo's settings for one case, given back when it ends: up to ``RECOMPILE_LIMIT`` shapes per compiled
    function, and past it an error (the phase fails with dynamo's reason) rather than a silent eager fallback. The
    runner enters it around every case; they matter only where something compiles."""
    import torch._dynamo.config as dynamo_config

    settings: dict[str, Any] = {"recompile_limit": RECOMPILE_LIMIT}
    if hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
        settings["fail_on_recompile_limit_hit"] = True
    return dynamo_config.patch(**settings)


def release_compiled_state() -> None:
    """Forget the compiled graphs and CUDA-graph trees of a case that ends, as a fresh process would start. They are
    process-wide: without this, each compiled case added its shapes to dynamo's cache of the decoder block's
    forward, and from the third compiled case of a session on, dynamo passed its recompile limit and ran the blocks
    eagerly (opt-6.7b fp8dq's perplexity pass on the H200: 0.438 s in a session without the reset, 0.212 s with
    it; docs/results.md section 5g)."""
    import torch._dynamo

    torch._dynamo.reset()


def cudagraph_skips() -> int:
    """How many compiled graphs inductor ran without CUDA graphs so far in this process (it logs the reason
    under ``TORCH_LOGS=perf_hints``): a compiled decode that should be one graph replay per token is not."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


@dataclass(frozen=True)
class PrefilledPrompt:
    """A prompt run into its static cache (:meth:`CompiledExecution.prefill`), ready to decode from."""

    cache: Any
    mask: torch.Tensor
    positions: torch.Tensor
    length: int  # prompt tokens
    first_token: torch.Tensor  # (batch, 1)
    counters: list[torch.Tensor]  # the cache's own write positions after the prompt (see cache_counters)


def cache_counters(cache: Any) -> list[torch.Tensor]:
    """The tensors in which a static cache counts the tokens written (transformers 5's ``StaticLayer``
    ``cumulative_length``, which decides where the next token's keys go, whatever the cache position passed); empty
    for a cache that writes at the cache position alone."""
    layers = getattr(cache, "layers", None) or []
    return [t for t in (getattr(layer, "cumulative_length", None) for layer in layers) if isinstance(t, torch.Tensor)]


def _has_bnb(model: Any) -> bool:
    return any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())


class BlockChain(torch.nn.Module):
    """The decoder blocks run in turn as one module (``chain_blocks``): compiled as one region, so that inductor can
    fuse across the boundary between two blocks (one block's residual add with the next one's layer norm). A block
    that returns a tuple passes its first element (the hidden states) on; the chain returns the last block's output
    as the model's own loop expects it. The model's loop sees a list of one element instead of its blocks: so passes
    that ask for each block's hidden states or attentions run per block (:meth:`CompiledExecution.forward`)."""

    def __init__(self, blocks: list[Any]) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        out: Any = hidden_states
        for block in self.blocks:
            out = block(hidden_states, *args, **kwargs)
            hidden_states = out[0] if isinstance(out, tuple) else out
        return out


def mixed_layer_types(config: Any) -> str | None:
    """Why the decoder blocks cannot be chained (:class:`BlockChain`): layers of several types (``layer_types``:
    sliding-window and full attention, Gemma 2/3, Qwen2 with a sliding window), to which the model's loop gives
    each its own mask by its index. None where the layers are alike."""
    kinds = list(dict.fromkeys(getattr(config, "layer_types", None) or ()))
    if len(kinds) < 2:
        return None
    return (f"its layers are of several types ({', '.join(map(str, kinds))}), each given its own attention mask by "
            "the model's loop")


def _parent_of(model: Any, module: Any) -> tuple[Any, str]:
    """(owner, attribute) under which ``model`` holds ``module``."""
    return next((m, name) for m in model.modules() for name, child in m.named_children() if child is module)


class CompiledExecution:
    """The state behind a compiled model: the compiled callables and the static caches."""

    def __init__(self, model: Any, backend: str, decode_options: dict[str, Any] | None,
                 forward_options: dict[str, Any] | None, cache_bucket: int, compile_head: bool,
                 compile_passes: bool = True, min_decode_batch: tuple[int, str] | None = None,
                 skip_repeat_guards: bool = True, chain_blocks: bool = False) -> None:
        self.model = model
        self.skip_repeat_guards = skip_repeat_guards
        self.min_decode_batch = min_decode_batch
        self.orig_forward = model.forward
        self.orig_generate = model.generate
        self.cache_bucket = cache_bucket
        self.step_options = decode_options
        # Passes without cache: regional compilation (each repeated decoder block compiled; the blocks share one
        # compiled graph per input shape), so that compile time is one block's, not the whole model's per shape.
        # The LM head is a region of its own: inductor pads a matmul whose sizes break the tensor cores' alignment
        # (GPT-2's 50,257-token vocabulary ran in align-1 CUTLASS kernels, 13% of gpt2-xl's pass on the H200).
        container, blocks = repeated_blocks(model)
        self.blocks = blocks if compile_passes else []
        self.head_name = output_head_name(model) if compile_head and compile_passes else None
        self.head = getattr(model, self.head_name) if self.head_name else None
        places: list[tuple[Any, str, Any]] = [(container, str(i), b) for i, b in enumerate(self.blocks)]
        if self.head_name:
            places.append((model, self.head_name, self.head))

        def compiled(m: Any) -> Any:
            return torch.compile(m, backend=backend, dynamic=False, options=forward_options)

        # (owner, attribute, eager module, compiled module): swapped in for a pass without cache, then back
        self.per_block_regions = [(owner, name, m, compiled(m)) for owner, name, m in places]
        self.regions = self.per_block_regions
        self.chain_refused = mixed_layer_types(model.config) if chain_blocks else None
        if chain_blocks and self.blocks and self.chain_refused is None:  # the list swapped for one chain of them
            owner, name = _parent_of(model, container)
            chain = torch.nn.ModuleList([compiled(BlockChain(self.blocks))])
            self.regions = [(owner, name, container, chain)] + self.per_block_regions[len(self.blocks):]
        self.step = torch.compile(self._step, backend=backend, options=decode_options, fullgraph=True,
                                  dynamic=False)
        params = inspect.signature(self.orig_forward).parameters
        self.takes_cache_position = "cache_position" in params
        self.cache_kw = cache_argument(model)
        self.caches: dict[tuple[int, int], tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self.max_positions = max_positions(model.config)
        self.calls = {"compiled_generate": 0, "hf_generate": 0, "compiled_forward": 0}
        self.cudagraph_skips_before = cudagraph_skips() if decode_options else 0

    @property
    def chained(self) -> bool:
        """Whether the passes run the decoder blocks as one region (``chain_blocks`` asked and not refused)."""
        return self.regions is not self.per_block_regions

    @property
    def cuda_graphs(self) -> bool:
        """Whether the compiled decode step was asked to replay CUDA graphs."""
        return bool((self.step_options or {}).get("triton.cudagraphs"))

    def cudagraph_skips(self) -> int | None:
        """Compiled graphs run without CUDA graphs since this model was compiled (None: CUDA graphs not asked)."""
        if not self.cuda_graphs:
            return None
        return cudagraph_skips() - self.cudagraph_skips_before

    # --- forward ---------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("use_cache") is False and kwargs.get(self.cache_kw) is None and self.blocks:
            self.calls["compiled_forward"] += 1
            per_block = kwargs.get("output_hidden_states") or kwargs.get("output_attentions")
            regions = self.per_block_regions if per_block else self.regions
            try:
                for owner, name, _, compiled in regions:
                    setattr(owner, name, compiled)
                return self.orig_forward(*args, **kwargs)
            finally:
                for owner, name, eager, _ in regions:
                    setattr(owner, name, eager)
        return self.orig_forward(*args, **kwargs)


    # --- decode ----------------------------------------------------------------------------------------
    def _kwargs(self, ids: torch.Tensor, pos: torch.Tensor, cache: Any, mask: torch.Tensor) -> dict[str, Any]:
        kw: dict[str, Any] = {"input_ids": ids, self.cache_kw: cache, "use_cache": True,
                              "position_ids": pos, "attention_mask": mask}
        if self.takes_cache_position:
            kw["cache_position"] = pos[0]
        return kw

    def _step(self, tok: torch.Tensor, pos: torch.Tensor, cache: Any, mask: torch.Tensor) -> torch.Tensor:
        logits = self.orig_forward(**self._kwargs(tok, pos, cache, mask)).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    def cache_for(self, batch: int, needed: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(static cache, attention mask, position ids) for ``needed`` tokens; all of the bucket's fixed length, so
        that the compiled step sees the same shapes and strides whatever the prompt and new-token counts."""
        from transformers import StaticCache

        length = min(-(-needed // self.cache_bucket) * self.cache_bucket, max(self.max_positions, needed))
        key = (batch, length)
        if key not in self.caches:
            cache = StaticCache(config=self.model.config, max_cache_len=length)
            mask = torch.ones(batch, length, dtype=torch.long, device=self.model.device)
            positions = torch.arange(length, device=self.model.device).repeat(batch, 1)
            self.caches[key] = (cache, mask, positions)
        return self.caches[key]

    def handles(self, input_ids: Any, attention_mask: Any, kwargs: dict[str, Any]) -> bool:
        if kwargs.get("do_sample") or kwargs.get("num_beams", 1) != 1:
            return False
        if set(kwargs) - {"do_sample", "min_new_tokens", "max_new_tokens", "pad_token_id", "num_beams", "streamer"}:
            return False
        n = kwargs.get("max_new_tokens")
        if not isinstance(n, int) or n < 1 or kwargs.get("min_new_tokens") != n:
            return False
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            return False
        return attention_mask is None or bool(attention_mask.bool().all())  # no padding

    def prefill(self, input_ids: torch.Tensor, new_tokens: int) -> PrefilledPrompt:
        """Run the prompt into a reset static cache sized for ``new_tokens`` more, eagerly; its first token."""
        batch, prompt_len = input_ids.shape
        if self.min_decode_batch and batch < self.min_decode_batch[0]:
            raise CompiledDecodeRefused(f"compiled decode at batch {batch}: needs a batch of at least "
                                        f"{self.min_decode_batch[0]}: {self.min_decode_batch[1]}")
        cache, mask, positions = self.cache_for(batch, prompt_len + new_tokens)
        with torch.inference_mode():
            cache.reset()
            out = self.orig_forward(**self._kwargs(input_ids, positions[:, :prompt_len], cache, mask))
            first = out.logits[:, -1].argmax(-1, keepdim=True)
            counters = [t.clone() for t in cache_counters(cache)]
        return PrefilledPrompt(cache, mask, positions, prompt_len, first, counters)

    def decode(self, prompt: PrefilledPrompt, steps: int, streamer: Any = None) -> list[torch.Tensor]:
        """``steps`` compiled one-token steps after ``prompt``'s first token: [first token, then one per step].
        Each call starts again from the prompt's cache (its write counters set back in place, the steps overwrite
        the same positions, and the causal mask hides the later ones), so the latency phase can time decode without
        the prefill."""
        tok = prompt.first_token
        tokens = [tok]
        with torch.inference_mode(), contextlib.ExitStack() as later_steps:
            if prompt.counters:  # in place: the compiled step holds these tensors' addresses
                torch._foreach_copy_(cache_counters(prompt.cache), prompt.counters)
            for i in range(steps):
                if i == 1 and self.skip_repeat_guards:
                    later_steps.enter_context(self._guards_checked_once())
                if streamer is not None:  # as in generate: the host receives each token (a sync per token)
                    streamer.put(tok.squeeze(-1).cpu())
                at = prompt.length + i
                tok = self.step(tok, prompt.positions[:, at:at + 1], prompt.cache, prompt.mask).clone()
                tokens.append(tok)  # .clone(): CUDA-graph outputs are reused by the next replay
        return tokens

    @staticmethod
    def _guards_checked_once() -> AbstractContextManager[Any]:
        """Entered for the steps after the first of a ``decode`` call when ``skip_repeat_guards``: dynamo skips its
        guard evaluation (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, which still tells apart the
        graphs compiled for other batch sizes). Safe here: those steps pass the same cache, mask and position
        tensors as the first, which checked the guards, and a token of the same shape, in the same grad mode. Why:
        on the H200 gpt2-xl's int4wo decode was paced by the host, 3.59 ms of host work a token with the guards
        checked on every step and 0.83 ms without (docs/results.md section 5i)."""
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)

    def generate(self, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
        if not self.handles(input_ids, attention_mask, kwargs):
            self.calls["hf_generate"] += 1
            return self.orig_generate(input_ids, attention_mask=attention_mask, **kwargs)
        n: int = kwargs["max_new_tokens"]
        streamer = kwargs.get("streamer")  # Hugging Face's protocol: put(prompt), put(each new token), end()
        prompt = self.prefill(input_ids, n)
        self.calls["compiled_generate"] += 1
        if streamer is not None:
            streamer.put(input_ids.cpu())
        tokens = self.decode(prompt, n - 1, streamer)
        if streamer is not None:
            streamer.put(tokens[-1].squeeze(-1).cpu())
            streamer.end()
        return torch.cat([input_ids, *tokens], dim=1)


def repeated_blocks(model: Any) -> tuple[Any, list[Any]]:
    """(the ``ModuleList``, its blocks): the transformer's decoder blocks, the longest list of one class."""
    best: Any = None
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > len(best or ()) and len({type(b) for b in m}) == 1:
            best = m
    return best, list(best or ())


def output_head_name(model: Any) -> str | None:
    """The attribute of ``model`` that holds its output embedding (``lm_head``), None when it is not a direct
    child (then the head runs uncompiled)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((name for name, child in model.named_children() if child is head), None)


def compiled_state(model: Any) -> CompiledExecution | None:
    """The compiled-execution state of a model, None when it runs eagerly."""
    state = getattr(model, "_efficiency_compiled", None)
    return state if isinstance(state, CompiledExecution) else None


@dataclass(frozen=True)
class Compile(TechniqueBase):
    backend: str = "inductor"
    cache_bucket: int = CACHE_BUCKET_TOKENS
    # inductor settings (``[tool.efficiency.technique.compile]``). Coordinate-descent tuning of the generated
    # kernels: None = automatic, on exactly when an earlier step asks for it (``INDUCTOR_OPTIONS_KEY`` in its
    # report: torchao int8wo / fp8wo on a GPU, whose dequantising matmuls inductor writes). Measured: bf16 decode
    # gains nothing from it (H100, docs/results.md section 5b; 26 s more compilation); opt-6.7b int8wo decode
    # takes 44.4 ms/token without it and 3.73 with it (H200, section 5d). Max-autotune (Triton GEMM templates
    # against cuBLAS): off, measured on the H200 (section 5e): opt-6.7b batch-1 decode 5.144 ms/token against 4.456
    # without it (its Triton templates replaced cuBLAS's GEMVs); for a perplexity pass its compilation did not end
    # within 98-141 s (5d), but at gpt2-xl's four matmul shapes inductor's GEMM autotuning kept cuBLAS every time:
    # its Triton templates, persistent TMA included, ran at 71-96% of cuBLAS's speed (H100, section 5r).
    coordinate_descent_tuning: bool | None = None
    max_autotune: bool = False
    # Freezing (weights as graph constants): off, measured on the H200 (docs/results.md section 5c): it did not
    # concatenate opt-6.7b's q/k/v GEMVs, and one compiled graph ran without CUDA graphs (8.67 ms/token against 4.91).
    freezing: bool = False
    # Fuse the projections that share an input (q/k/v, gate/up) before quantisation (techniques/fusion.py; the
    # pipeline does it, Pipeline.fusion_index): on, measured on the H200 (section 5c): opt-6.7b batch-1 decode
    # 4.694 -> 4.372 ms/token in bf16, gemlite int4 4.219 -> 3.454 ms/token (across two calls).
    fuse_projections: bool = True
    # Compile the LM head as a region of its own in passes without cache (inductor pads misaligned vocabularies):
    # on, measured on the H200 (section 5c): gpt2-xl's perplexity pass 0.907 -> 0.837 s.
    compile_head: bool = True
    # Fuse a linear layer's bias and the activation after it into the matmul's epilogue (techniques/epilogue.py:
    # OPT's fc1 + ReLU, GPT-2's c_fc + tanh-GELU on a GPU; plain weights only). Measured: docs/results.md 5j.
    fuse_bias_activation: bool = True
    # Pass tensor-subclass weights (torchao's) to the compiled graphs as plain tensors (unwrap_weight_subclasses):
    # on, measured on the H200 (docs/results.md section 5i): opt-6.7b int4wo decode 4.02 -> 3.03 ms/token.
    unwrap_subclasses: bool = True
    # Inductor's combo kernels in the compiled decode step, on a GPU (Triton kernels; the passes keep them off,
    # unmeasured there): independent small kernels of a step launched as one. On, measured on the H100
    # (docs/results.md section 5n, each pair side by side in one call): opt-6.7b batch-1 decode 5.791 -> 5.699
    # ms/token in bf16, int4wo 3.013 -> 2.870.
    combo_kernels: bool = True
    # Programmatic dependent launch of inductor's Triton kernels (``triton.enable_pdl``; compute capability 9.0
    # and later): a kernel is launched while the one before it finishes and waits for its results on the GPU, so
    # the gaps between kernels shrink. On, in decode and in the passes, measured on the H100 (docs/results.md
    # section 5o, with the setting's environment variable, side by side): opt-6.7b batch-1 decode 5.698 -> 5.519
    # ms/token in bf16 (probe), 5.702 -> 5.520 through the suite's grid; int4wo 2.881 -> 2.772 (probe); the
    # opt-1.3b perplexity pass unchanged within its spread; and through this setting, opt-1.3b decode 1.709 ->
    # 1.603 ms/token (probe).
    pdl: bool = True
    # Evaluate dynamo's guards on the first step of each decode call only (CompiledExecution._guards_checked_once):
    # on, measured on the H200 (docs/results.md section 5i): gpt2-xl int4wo-g64 decode 3.63 -> 2.52 ms/token.
    skip_repeat_guards: bool = True
    # Inductor's multi-kernel in the passes without cache, on a GPU (``triton.multi_kernel``): each reduction (a
    # layer norm over 1,600 or 2,048 features, past inductor's 1,024 for a persistent kernel) compiled both as a
    # persistent and as a looped kernel, the faster chosen at its first run. On, measured on the H100
    # (docs/results.md section 5p): gpt2-xl's perplexity pass 0.810 -> 0.776 s (its layer norms 69 -> 34 ms);
    # opt-1.3b's unchanged within its spread.
    multi_kernel: bool = True
    # Compile the decoder blocks of the passes without cache as one region that runs them in turn (BlockChain),
    # instead of one region per block, so that inductor fuses across the blocks' boundaries (in bf16 not
    # bit-identical: opt-125m's perplexity on the CPU moved by 3.8e-5 to 6.5e-5 relative in three runs, the probe's
    # at c88fd37 and c7ca2c4 and a grid run of bf16+compile); compilation then takes the whole
    # stack's time instead of one block's. Refused, with the reason in the report, for layers of several types
    # (mixed_layer_types). Off: measured on the H100 without a gain (docs/results.md 5q: opt-1.3b's pass 0.5769 s
    # against 0.5780 and 0.5775, gpt2-xl's 0.7707 against 0.7701, each inside the other's range) and with 3-6x the
    # warm-up (benchmarks/gpu/decode_probe.py, flag ``chain``).
    chain_blocks: bool = False
    name: str = "compile"
    family = "execution"

    def check(self, ctx: Context) -> None:
        if not torch._dynamo.is_dynamo_supported():
            raise UnsupportedTechnique("torch.compile is not supported on this Python / platform")
        if self.backend == "inductor" and not ctx.is_cuda and shutil.which("cc") is None \
                and shutil.which("gcc") is None:
            raise UnsupportedTechnique("torch.compile on the CPU needs a C compiler (cc/gcc), none on PATH")

    def apply(self, model: Any, ctx: Context) -> Any:
        order = ctx.info.get("order") or [self.name]
        if ctx.steps_done != len(order) - 1:
            raise ConfigError(f"'compile' must be the last step of a pipeline, got {'+'.join(order)}")
        if _has_bnb(model):
            raise UnsupportedTechnique("compile: bitsandbytes layers break torch.compile graphs (their kernels "
                                       "are opaque to it); measure the eager case (without +compile) instead")
        cuda_graphs = ctx.is_cuda  # CUDA graphs need a GPU
        decode_options: dict[str, Any] | None
        forward_options: dict[str, Any] | None
        asked = inductor_options_asked(ctx.info)
        tuning = self.coordinate_descent_tuning
        if tuning is None:
            tuning = bool(asked.get("coordinate_descent_tuning", False))
        pdl_off = ("pdl = false" if not self.pdl else f"an inductor setting, not for backend {self.backend!r}"
                   if self.backend != "inductor" else pdl_unavailable(ctx))  # why not, None when on
        pdl = pdl_off is None
        if self.backend == "inductor":  # what earlier steps ask for, then this step's own settings on top
            decode_options = {**asked, **inductor_options(cuda_graphs, tuning, self.max_autotune, self.freezing,
                                                          self.combo_kernels and ctx.is_cuda, pdl)}
            forward_options = {**asked, **inductor_options(False, tuning, self.max_autotune, self.freezing,
                                                           pdl=pdl, multi_kernel=self.multi_kernel and ctx.is_cuda)}
        else:  # other backends take no inductor options
            decode_options = forward_options = None
            cuda_graphs = False
        epilogues = fuse_bias_activations(model) if self.fuse_bias_activation else {}
        unwrapped, wrapped, constants = unwrap_weight_subclasses(model) if self.unwrap_subclasses else (0, {}, {})
        eager_why = eager_passes_asked(ctx.info)
        min_batch = min_decode_batch_asked(ctx.info)
        state = CompiledExecution(model, self.backend, decode_options, forward_options, self.cache_bucket,
                                  self.compile_head, compile_passes=eager_why is None, min_decode_batch=min_batch,
                                  skip_repeat_guards=self.skip_repeat_guards, chain_blocks=self.chain_blocks)
        # Keep the signatures callers inspect (the perplexity pass asks for logits_to_keep only where forward
        # takes it): the wrappers carry the originals' metadata, __wrapped__ included.
        model.forward = functools.wraps(state.orig_forward)(lambda *a, **kw: state.forward(*a, **kw))
        model.generate = functools.wraps(state.orig_generate)(lambda *a, **kw: state.generate(*a, **kw))
        model._efficiency_compiled = state
        ctx.info[self.name] = {
            "backend": self.backend,
            "torch": torch.__version__,
            "decode": f"static KV cache (prompt + new tokens rounded up to {self.cache_bucket}), greedy loop, "
                      f"one-token step torch.compile(fullgraph, options={decode_options}); prefill eager",
            "forward": (f"eager, asked for by an earlier step: {eager_why}" if eager_why else
                        f"regional torch.compile(dynamic=False) of the {len(state.blocks)} decoder blocks "
                        f"({_block_regions(self.chain_blocks, state.chain_refused)}) and "
                        f"{'the LM head' if state.head_name else 'no LM head'} for passes without cache "
                        "(perplexity, prefill)"),
            "decode_min_batch": (f"{min_batch[0]}, asked for by an earlier step: {min_batch[1]}" if min_batch
                                 else None),
            "cuda_graphs": cuda_graphs,
            "decode_guards": ("evaluated on the first step of each decode call, skipped on its later steps (same "
                              "tensors; torch.compiler.set_stance(skip_guard_eval_unsafe=True))"
                              if self.skip_repeat_guards else "evaluated on every step"),
            "fuse_projections": self.fuse_projections,  # what was fused: the report's "fused_projections"
            "bias_activation_epilogues": (epilogues or "none fused: no plain linear layer with a bias before a ReLU "
                                          "(or a tanh-GELU on a GPU)") if self.fuse_bias_activation else
                                         "off (fuse_bias_activation = false)",
            "unwrapped_weights": (f"{unwrapped} tensor-subclass weights passed to the compiled graphs as their plain "
                                  "inner tensors (torchao's UnwrapTensorSubclass)" if unwrapped else
                                  None if self.unwrap_subclasses else "off (unwrap_subclasses = false)"),
            "wrapped_weights": ({kind: f"left as a tensor subclass: dynamo cannot trace its rebuild here ({why})"
                                 for kind, why in wrapped.items()} or None),
            "weights_with_constant_attributes": ({kind: f"{', '.join(names)} held as class constants, which dynamo "
                                                  "cannot pass to the rebuild (techniques/unwrap.py)"
                                                  for kind, names in constants.items()} or None),
            "programmatic_dependent_launch": (f"off: {pdl_off}" if pdl_off else "on: inductor's Triton kernels "
                                              f"launch before the kernel they depend on ends ({PDL_OPTION})"),
            "inductor": None if eager_why else forward_options,  # the passes' settings, None when they run eager
            "coordinate_descent_tuning": ("set" if self.coordinate_descent_tuning is not None else
                                          "automatic: " + ("on, asked for by an earlier step" if tuning else
                                                           "off, no earlier step asked for it")),
            "asked_by_earlier_steps": asked,
            "warm_up": "compilation at the first call of each shape, in the phases' untimed setup (setup_s)",
            "shapes": (f"at most {RECOMPILE_LIMIT} static shapes per compiled function in this case; past that the "
                       "phase fails with dynamo's reason instead of running eagerly under this label"),
        }
        return model


def _block_regions(chain_blocks: bool, refused: str | None) -> str:
    if not chain_blocks:
        return "one region each"
    return f"one region each: chain_blocks refused, {refused}" if refused else "as one region run in turn"


@register(r"compile", "compile (last step: bf16+compile, int4wo+compile)", ("compile",))
def _compile(m: re.Match[str]) -> Compile:
    return Compile()
