"""Inference-optimised quantisation through torchao: ``int8wo``, ``int4wo``, ``fp8wo``, ``fp8dq``, ``int8dq``.

Each is one torchao config applied with ``torchao.quantization.quantize_`` to the transformer's linear layers (the
LM head and embeddings stay; GPT-2's ``Conv1D`` layers become ``nn.Linear`` first). The report names the kernel
that runs and the tensor subclass torchao put in place of the weight (``ctx.info``): on the CPU the operators of
one eager call of a quantised layer, observed (``observed_kernel``); on a GPU the kernel the leases' kernel tables
showed.

- ``int8wo``: int8 weights per channel, activations in the model's dtype; CUDA: the int8 weight dequantised inside
  the matmul (fused by inductor under compile); CPU, torchao 0.18: eagerly ``aten.mm`` on the weight converted at
  each call, under ``compile`` in bf16 ``aten._weight_int8pack_mm`` (docs/results.md section 5k).
- ``int4wo`` (group 128; ``int4wo-g64``: 64; ``-hqq``: HQQ scales), bf16 activations: CUDA: tinygemm
  ``_weight_int4pack_mm`` (tile-packed); CPU: ``_weight_int4pack_mm_for_cpu`` through torchao's prototype
  ``Int4OpaqueTensor`` (the CPU packing that left torchao's main config), measured in docs/results.md section 5k.
- ``fp8wo``: fp8 e4m3 weights per channel, bf16 activations, dequantised inside the matmul.
- ``fp8dq``: fp8 weights and dynamically quantised fp8 activations, per row: ``torch._scaled_mm``; CUDA with
  compute capability >= 8.9 only. The layers' biases are added after the GEMM (:func:`move_bias_after_matmul`),
  not in its epilogue, where cuBLASLt has no algorithm for wide inputs at few rows (batch-1 decode).
- ``int8dq``: int8 weights per channel, int8 activations per token (dynamic): ``torch._int_mm``.

The int4 packing: without fbgemm-gpu-genai (its ``plain``/``preshuffled`` formats), tinygemm is torchao's int4
kernel on CUDA; gemlite's Triton kernels are the alternative (``gemlite-int4``, efficiency.techniques.gemlite_quant),
and benchmarks/gpu/run.sh deploy measures both side by side (docs/results.md names the faster).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from efficiency.measure.ops import aten_ops_called, describe_quantised_matmul
from efficiency.techniques.base import MATMUL_DTYPE_KEY, Context, TechniqueBase, UnsupportedTechnique, register
from efficiency.techniques.bnb import default_filter, is_conv1d, swap_modules
from efficiency.techniques.compile import EAGER_PASSES_KEY, INDUCTOR_OPTIONS_KEY, MIN_DECODE_BATCH_KEY

KERNELS_CUDA = {
    "int8wo": "int8 weight-only: eager, dequantise + bf16 GEMM; under compile the decode step runs inductor's "
              "fused dequantising matmul (Triton) and passes without cache stay eager",
    "int4wo": "tinygemm torch.ops.aten._weight_int4pack_mm (int4 tile-packed, asymmetric, grouped)",
    "fp8wo": "fp8 e4m3 weight-only: weight dequantised inside the matmul (inductor-fused under compile)",
    "fp8dq": "torch._scaled_mm (cuBLASLt fp8 e4m3 GEMM, per-row scales, dynamic activation quantisation)",
    "int8dq": "torch._int_mm (int8 GEMM, dynamic per-token activation quantisation)",
}
# On the CPU the kernel is observed instead (``observed_kernel``): torchao 0.18's int8wo ran aten.mm on the weight
# converted at each call where a table had said aten._weight_int8pack_mm (docs/results.md section 5k).
KERNEL_SOURCE_CUDA = "the kernel tables of the GPU leases (docs/results.md sections 5c-5j)"
KERNEL_SOURCE_OBSERVED = "observed: the ATen operators of one eager call of a quantised layer (torch.profiler)"
GPU_ONLY = {"fp8dq": "fp8 GEMMs (torch._scaled_mm) need a CUDA GPU"}
# int4wo on the CPU: torchao keeps its CPU int4 packing in its prototype namespace (Int4OpaqueTensor, whose matmul
# is aten._weight_int4pack_mm_for_cpu), under the config's name in 0.18 and in 0.17 (docs/results.md section 5k)
CPU_INT4_MODULE = "torchao.prototype.quantization.int4"
CPU_INT4_CONFIGS = ("PrototypeInt4WeightOnlyConfig", "Int4WeightOnlyOpaqueTensorConfig")


def cpu_int4_config_class() -> Any:
    """torchao's config class for int4 weight-only on the CPU; UnsupportedTechnique when this torchao has none."""
    import torchao

    try:
        module = importlib.import_module(CPU_INT4_MODULE)
        why = f"no {' or '.join(CPU_INT4_CONFIGS)} in it"
    except ImportError as err:
        module, why = None, f"{type(err).__name__}: {err}"
    for name in CPU_INT4_CONFIGS:
        if hasattr(module, name):
            return getattr(module, name)
    raise UnsupportedTechnique(f"int4wo on the CPU needs torchao's {CPU_INT4_MODULE} (Int4OpaqueTensor, "
                               f"aten._weight_int4pack_mm_for_cpu); torchao {torchao.__version__}: {why}")


def require_torchao() -> Any:
    try:
        import torchao
        from torchao.quantization import quantize_
    except Exception as err:  # ImportError, or a native library built for another torch
        raise UnsupportedTechnique(f"torchao is not usable here: {type(err).__name__}: {err}") from err
    return torchao, quantize_


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace GPT-2's ``Conv1D`` (weight stored (in, out)) by ``nn.Linear`` with the same function."""

    def make(mod: nn.Module, name: str) -> nn.Module:
        conv: Any = mod
        w = conv.weight.detach()  # (in, out) in Conv1D
        bias = conv.bias
        lin = nn.Linear(w.shape[0], w.shape[1], bias=bias is not None, device=w.device, dtype=w.dtype)
        lin.weight = nn.Parameter(w.t().contiguous(), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return lin

    return swap_modules(model, make, lambda m, n: is_conv1d(m))


OUTPUT_BIAS = "bias_after_matmul"  # where move_bias_after_matmul keeps a layer's bias
FP8DQ_BIAS_REASON = ("cuBLASLt has no algorithm for torch._scaled_mm's per-row fp8 GEMM with a bias epilogue when "
                     "the input is wide and the rows few: opt-6.7b's fc2 (16384 -> 4096) failed at 1, 16 and 17 "
                     "rows with CUBLAS_STATUS_NOT_SUPPORTED, and ran without the bias (H200, docs/results.md 5g)")


def _add_output_bias(layer: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output + getattr(layer, OUTPUT_BIAS)


def move_bias_after_matmul(model: nn.Module, names: list[str]) -> int:
    """Take the bias of the named linear layers out of their matmul: the layer keeps it as the parameter
    ``OUTPUT_BIAS`` and a forward hook adds it to the output (which inductor fuses with what follows). Same
    function, same parameters; returns how many layers had a bias."""
    moved = 0
    for name in names:
        layer = model.get_submodule(name)
        bias = getattr(layer, "bias", None)
        if bias is None:
            continue
        layer.bias = None  # type: ignore[assignment]
        layer.register_parameter(OUTPUT_BIAS, bias)
        layer.register_forward_hook(_add_output_bias)
        moved += 1
    return moved


INT4_GROUP_SIZES = (32, 64, 128, 256)  # the int4wo-gNN names the registry takes


def input_widths(model: nn.Module) -> dict[str, int]:
    """The input width of each layer torchao quantises (the default filter: every linear layer but the LM head),
    by name: ``nn.Linear``'s ``in_features``, GPT-2 ``Conv1D``'s weight rows (it stores (in, out))."""
    return {n: int(m.in_features) if isinstance(m, nn.Linear) else int(m.weight.shape[0])
            for n, m in model.named_modules() if n and default_filter(m, n)}


def refuse_misfit_groups(name: str, widths: Mapping[str, int], group_size: int,
                         sizes: tuple[int, ...] = INT4_GROUP_SIZES, family: str = "int4wo") -> None:
    """UnsupportedTechnique when a layer's input width (``widths``: name -> inputs) is not a multiple of
    ``group_size`` (torchao would leave it unquantised without saying so: GPT-2 XL's 1600-wide layers under group
    128), naming the largest of ``sizes`` that fits every layer (``<family>-gNN``)."""
    misfit = [n for n, width in widths.items() if width % group_size]
    if not misfit:
        return
    fits = [g for g in sizes if all(width % g == 0 for width in widths.values())]
    hint = f"{family}-g{max(fits)} fits every layer" if fits else f"no {family} group size fits every layer"
    raise UnsupportedTechnique(f"{name}: {len(misfit)} of {len(widths)} linear layers ({misfit[0]}: "
                               f"{widths[misfit[0]]} inputs) are not a multiple of the group size {group_size}; "
                               f"{hint}")


def is_torchao_tensor(t: Any) -> bool:
    """Whether ``t`` is one of torchao's quantised tensors (``TorchAOBaseTensor``); False without a usable torchao."""
    try:
        from torchao.utils import TorchAOBaseTensor
    except Exception:  # ImportError, or a native library built for another torch: no torchao tensors either
        return False
    return isinstance(t, TorchAOBaseTensor)


def unquantised(model: nn.Module, targets: list[str]) -> list[str]:
    """The target layers whose weight is still a plain tensor after ``quantize_``."""
    return [n for n in targets if not is_torchao_tensor(model.get_submodule(n).weight)]


@dataclass(frozen=True)
class TorchaoQuant(TechniqueBase):
    kind: str  # int8wo | int4wo | fp8wo | fp8dq | int8dq
    group_size: int = 128
    hqq: bool = False  # int4wo: scales and zero points by HQQ's optimiser instead of min/max
    family = "quantisation"
    preserves_layer_shapes = True

    @property
    def name(self) -> str:
        group = f"-g{self.group_size}" if self.kind == "int4wo" and self.group_size != 128 else ""
        return self.kind + group + ("-hqq" if self.hqq else "")

    def config(self, on_cpu: bool = False) -> Any:
        """torchao's config for ``kind``; ``set_inductor_config=False`` everywhere: torchao would otherwise change
        inductor's process-wide settings (and, in 0.17, the fp32 matmul precision) for every later case of the session.
        The settings its kernels need reach ``compile`` through the report (``TorchaoQuant.inductor_options``)."""
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
        )

        if self.kind == "int8wo":
            return Int8WeightOnlyConfig(set_inductor_config=False)
        if self.kind == "int4wo" and on_cpu:
            return cpu_int4_config_class()(group_size=self.group_size,
                                           int4_choose_qparams_algorithm="hqq" if self.hqq else "tinygemm",
                                           set_inductor_config=False)
        if self.kind == "int4wo":
            return Int4WeightOnlyConfig(group_size=self.group_size, int4_packing_format="tile_packed_to_4d",
                                        int4_choose_qparams_algorithm="hqq" if self.hqq else "tinygemm",
                                        set_inductor_config=False)
        if self.kind == "fp8wo":
            return Float8WeightOnlyConfig(set_inductor_config=False)
        if self.kind == "fp8dq":
            from torchao.quantization import PerRow

            return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
        if self.kind == "int8dq":
            return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
        raise ValueError(self.kind)

    def check(self, ctx: Context) -> None:
        require_torchao()
        if self.kind in GPU_ONLY and not ctx.is_cuda:
            raise UnsupportedTechnique(f"{self.name}: {GPU_ONLY[self.kind]}")
        if self.kind == "int4wo" and not ctx.is_cuda:
            cpu_int4_config_class()
        if ctx.is_cuda:
            if not torch.cuda.is_available():
                raise UnsupportedTechnique(f"{ctx.device} requested but CUDA is not available")
            cap = torch.cuda.get_device_capability(ctx.device)
            if self.kind.startswith("fp8") and cap < (8, 9):
                raise UnsupportedTechnique(f"{self.name}: fp8 needs compute capability >= 8.9, this GPU has "
                                           f"{cap[0]}.{cap[1]}")
            if self.kind == "int4wo" and cap < (8, 0):
                raise UnsupportedTechnique(f"{self.name}: tinygemm needs compute capability >= 8.0 (bf16)")

    def check_layers(self, skeleton: Callable[[], nn.Module]) -> None:
        """int4: every layer's inputs a multiple of the group, read from the model's config before it loads."""
        if self.kind == "int4wo":
            refuse_misfit_groups(self.name, input_widths(skeleton()), self.group_size)

    def inductor_options(self, ctx: Context) -> dict[str, Any]:
        """The inductor settings a later ``compile`` step needs for this technique's kernels: torchao recommends
        them, and by default sets them process-wide (and, in 0.17, TF32 for every fp32 matmul of the process);
        the suite asks for them in the report instead (``INDUCTOR_OPTIONS_KEY``), so no case changes the next.
        int8wo and fp8wo on a GPU have no matmul kernel of their own: inductor writes the dequantising matmul, which
        needs coordinate-descent tuning (int8wo, opt-6.7b decode on the H200: 44.4 ms/token untuned, 3.73 tuned
        with torchao's process-wide settings, 0.91-1.00x of bf16's speed with these in three calls, sections 5e and
        5f; fp8wo by the same mechanism, not measured). int8dq's int8 matmul is fused with its scaling."""
        if not ctx.is_cuda:
            return {}
        if self.kind in ("int8wo", "fp8wo"):
            return {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True}
        if self.kind == "int8dq":
            return {"force_fuse_int_mm_with_mul": True}
        return {}

    def eager_passes(self, ctx: Context, compute_dtype: str) -> str | None:
        """Why a later ``compile`` must leave passes without cache (perplexity, prefill) eager, None when it need
        not. int8wo with bf16 activations: inductor rewrites its matmul (int8 weight converted, then the scales) to
        ``aten._weight_int8pack_mm``. On a GPU that kernel is a plain fp32 loop: opt-1.3b's perplexity pass took
        18.8 s compiled against 0.072 s eager (H200, docs/results.md section 5e). On the CPU it is what makes decode
        faster (bf16+int8wo+compile 1.21-1.71x bf16+compile, section 5k), but over a pass's many rows it is slower
        than the bf16 GEMM: SmolLM2's pass took 4.25 and 4.20 s compiled against 2.89 and 2.55 s eager, its 128-token
        prefill 265 and 238 ms against 195 and 194 (two runs, section 5k). In fp32 inductor keeps ``aten.mm``."""
        if self.kind != "int8wo":
            return None
        if ctx.is_cuda:  # whatever the dtype: only bf16 was measured, and a GPU case is bf16 (load_dtype)
            return ("int8wo: inductor lowers its matmul to aten._weight_int8pack_mm, whose CUDA kernel ran the "
                    "perplexity pass 259x slower than eager (H200)")
        if compute_dtype != "bfloat16":
            return None
        return ("int8wo: inductor lowers its bf16 matmul to aten._weight_int8pack_mm, which on the CPU ran the "
                "perplexity pass 1.47-1.65x and the prefill 1.23-1.36x slower than eager (decode stays compiled: "
                "faster with it)")

    def min_decode_batch(self, ctx: Context) -> list[Any] | None:
        """[smallest batch, why] at which a later ``compile``'s decode step can run, None: any. int8dq on a GPU:
        inductor calls ``torch._int_mm`` (cuBLAS) directly in the decode step, and cuBLAS takes more than 16 rows;
        batch-1 decode failed inside its CUDA-graph recording (opt-125m and opt-6.7b, H200, section 5f)."""
        if ctx.is_cuda and self.kind == "int8dq":
            return [17, "int8dq: torch._int_mm takes more than 16 rows on CUDA (one row per sequence in decode); "
                        "eager int8dq decode ran, but at 594.6 ms/token on opt-125m (H200)"]
        return None

    def matmul_dtype(self, ctx: Context) -> str | None:
        """The dtype of the quantised linear layers' matmuls where it is not the compute dtype: int8dq's int8 and
        fp8dq's fp8 GEMMs (weight-only kinds dequantise to the compute dtype and multiply in it)."""
        if not ctx.is_cuda:
            return None
        return {"int8dq": "int8", "fp8dq": "float8"}.get(self.kind)

    def load_dtype(self, ctx: Context) -> torch.dtype | None:
        # tinygemm and the CPU int4 kernel take bf16; the other weight-only kernels run in the model's dtype.
        if self.kind == "int4wo" or ctx.is_cuda:
            return torch.bfloat16
        return torch.float32

    def apply(self, model: Any, ctx: Context) -> Any:
        torchao, quantize_ = require_torchao()
        if self.kind == "int4wo" and next(model.parameters()).dtype != torch.bfloat16:
            claimed = ctx.info.get("dtype")
            if claimed not in (None, "bf16"):  # fp16+int4wo would run bf16 while the report says fp16
                raise UnsupportedTechnique(f"{self.name}: its kernels take bf16 activations, but an earlier step made "
                                           f"the model {claimed}; use bf16+{self.name}, or {self.name} alone")
            model = model.to(torch.bfloat16)  # the int4 kernels take bf16 activations
        converted = conv1d_to_linear(model)
        widths = input_widths(model)
        targets = list(widths)
        if not targets:
            raise UnsupportedTechnique(f"{self.name}: the model has no linear layers to quantise")
        if self.kind == "int4wo":
            refuse_misfit_groups(self.name, widths, self.group_size)
        biases_moved = move_bias_after_matmul(model, targets) if self.kind == "fp8dq" else 0
        chosen = set(targets)
        config = self.config(on_cpu=not ctx.is_cuda)
        quantize_(model, config,
                  filter_fn=lambda m, fqn: fqn in chosen)
        left = unquantised(model, targets)
        if left:  # torchao skips a layer it cannot quantise with a log line, not an error
            raise UnsupportedTechnique(f"{self.name}: torchao left {len(left)} of {len(targets)} linear layers "
                                       f"unquantised ({', '.join(left[:3])}{', ...' if len(left) > 3 else ''}); "
                                       "measuring the case would describe a model that is not the technique's")
        layer = model.get_submodule(targets[0])
        weight = layer.weight
        compute_dtype = str(next(p for p in model.parameters()).dtype).removeprefix("torch.")
        observed = None if ctx.is_cuda else observed_kernel(layer)
        ctx.info[self.name] = {
            "library": f"torchao {torchao.__version__}",
            "config": type(config).__name__,
            "kernel": (KERNELS_CUDA[self.kind] if observed is None
                       else describe_quantised_matmul(observed, compute_dtype)),
            "kernel_source": KERNEL_SOURCE_CUDA if observed is None else KERNEL_SOURCE_OBSERVED,
            "kernel_ops_observed": observed,
            "weight_tensor": type(weight).__name__,
            "quantised_layers": len(targets),
            "conv1d_converted": converted,
            "group_size": self.group_size if self.kind == "int4wo" else None,
            "qparams": ("hqq" if self.hqq else "min/max (round to nearest)") if self.kind == "int4wo" else None,
            "bias": (f"added after the GEMM in {biases_moved} layers: {FP8DQ_BIAS_REASON}" if biases_moved
                     else None),
            "compute_dtype": compute_dtype,
            INDUCTOR_OPTIONS_KEY: self.inductor_options(ctx),
            EAGER_PASSES_KEY: self.eager_passes(ctx, compute_dtype),
            MIN_DECODE_BATCH_KEY: self.min_decode_batch(ctx),
            MATMUL_DTYPE_KEY: self.matmul_dtype(ctx),
        }
        return model


def observed_kernel(layer: nn.Module) -> list[str]:
    """The ATen operators one eager call of a quantised linear ``layer`` runs, on one row of its input size in
    its dtype and device (measure/ops.py)."""
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)  # torchao's subclasses are tensors
    x = torch.randn(1, int(weight.shape[-1]), dtype=weight.dtype, device=weight.device)
    with torch.inference_mode():
        return aten_ops_called(lambda: layer(x))


@register(r"int8wo|fp8wo|fp8dq|int8dq", "int8wo | fp8wo | fp8dq | int8dq (torchao)",
          ("int8wo", "fp8wo", "fp8dq", "int8dq"))
def _torchao(m: re.Match[str]) -> TorchaoQuant:
    return TorchaoQuant(m.group(0))


@register(r"int4wo(?:-g(32|64|128|256))?(-hqq)?", "int4wo[-g64][-hqq] (torchao tinygemm, group 128 by default)",
          ("int4wo", "int4wo-g64", "int4wo-hqq"))
def _int4wo(m: re.Match[str]) -> TorchaoQuant:
    return TorchaoQuant("int4wo", int(m.group(1) or 128), hqq=bool(m.group(2)))
