"""Which operators a call ran, observed with ``torch.profiler`` (its host-side operator events), so that a report
names the matmul kernel a layer or a decode step actually called instead of the one a table expected.

Why: the table said that torchao's int8 weight-only layers run ``aten._weight_int8pack_mm`` on the CPU. With
torchao 0.18 they do not: eagerly they convert the int8 weight to the compute dtype at each call and run
``aten.mm``; only under ``compile`` in bf16 does inductor rewrite that into ``aten._weight_int8pack_mm``
(docs/results.md section 5k). A library version, a dtype or the compiler changes the kernel, so it is observed.

What cannot be observed this way: a CUDA-graph replay runs no operator on the host (the caller says so), and a
matmul that inductor generates as its own kernel (a Triton or C++ template) is no ATen operator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

# ATen operators that multiply matrices (what a linear layer ends in), by name without the "aten::" prefix
MATMUL_OPS: frozenset[str] = frozenset({
    "mm", "addmm", "bmm", "baddbmm", "_addmm_activation", "_int_mm", "_scaled_mm", "_weight_int8pack_mm",
    "_weight_int4pack_mm", "_weight_int4pack_mm_for_cpu", "_weight_int4pack_mm_with_scales_and_zeros",
})
# operators that call one of the above (their events enclose it); named only when none of the above is seen
COMPOSITE_MATMUL_OPS: frozenset[str] = frozenset({"linear", "matmul"})
# matmuls on a floating-point weight: the weight of a quantised layer was converted to a float dtype first
FLOAT_MATMUL_OPS: frozenset[str] = frozenset({"mm", "addmm", "bmm", "baddbmm", "_addmm_activation"})


def aten_ops_called(call: Callable[[], Any]) -> list[str]:
    """The ATen operators ``call()`` ran on the host, sorted, without the ``aten::`` prefix (``["mm", "t"]``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    return sorted({e.key.removeprefix("aten::") for e in prof.key_averages() if e.key.startswith("aten::")})


def _matmul_names(ops: Iterable[str]) -> list[str]:
    """The matmul operators among ``ops``, sorted; the composite ones (``linear``, ``matmul``) only when no other
    was seen."""
    seen = sorted(set(ops))
    return [op for op in seen if op in MATMUL_OPS] or [op for op in seen if op in COMPOSITE_MATMUL_OPS]


def matmul_ops(ops: Iterable[str]) -> list[str]:
    """The matmul operators among ``ops`` as ``aten.<name>`` (:func:`_matmul_names`)."""
    return [f"aten.{op}" for op in _matmul_names(ops)]


def describe_quantised_matmul(ops: Iterable[str], compute_dtype: str) -> str:
    """What the matmul of one quantised layer's call was, from the operators it ran: a quantised kernel
    (``aten._weight_int8pack_mm``), or a float matmul on the weight converted to ``compute_dtype`` at each call."""
    seen = set(ops)
    found = _matmul_names(seen)
    if not found:
        return "no ATen matmul operator observed"
    names = ", ".join(f"aten.{op}" for op in found)
    if set(found) <= FLOAT_MATMUL_OPS | COMPOSITE_MATMUL_OPS and "_to_copy" in seen:
        return f"{names} on the weight converted to {compute_dtype} at each call (aten._to_copy)"
    return names
