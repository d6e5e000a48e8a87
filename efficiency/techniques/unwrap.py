"""torchao's quantised weights passed to the compiled graphs as plain tensors (``compile``'s ``unwrap_subclasses``).

A compiled call flattens every tensor-subclass input in Python, and a decode step takes all the weights: on the
H200 (opt-6.7b, int4wo, batch-1 decode, docs/results.md section 5i) the host took 3.97 ms to issue each step with
torchao's subclasses (99% of the step: the GPU waited) and 1.69 ms with the weights unwrapped, and a step took
4.02 against 3.03 ms. :func:`unwrap_weight_subclasses` makes each such weight a parametrization
(``torchao.utils.UnwrapTensorSubclass``) that rebuilds torchao's tensor from its inner tensors, which dynamo
traces into the graph, so the same kernels run on the same data.

The rebuild is a call of the tensor's class that dynamo records in the graph, and it records only tensors and plain
values (None, numbers, strings, dtypes, enums, tuples of them). torchao's ``Float8Tensor`` of fp8dq also carries
its activation-quantisation settings, a dataclass, and dynamo stops there (``Unsupported: Failed to convert
args/kwargs to proxy``, seen on the H200's torch 2.11 and on this CPU's torch 2.13): fp8dq's weights stayed
wrapped and its decode was paced by the host (section 5i). Such attributes become constants of a subclass
(:func:`constant_attribute_class`): its flatten leaves them out and its constructor takes them from the class, so
the rebuild passes tensors and plain values only; the subclass inherits its parent's kernels (torchao copies the
dispatch tables to subclasses), and the attributes keep their values. A weight whose rebuild still does not trace
stays wrapped, with dynamo's reason in the report.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable
from typing import Any

import torch

# Values dynamo records in a graph as they are (with tuples and lists of them, named tuples included).
_PLAIN_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device, enum.Enum)


def is_plain(value: Any) -> bool:
    """Whether dynamo can pass ``value`` to a call it records in a graph."""
    if isinstance(value, _PLAIN_TYPES):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    return False


def subclass_weight(module: Any) -> bool:
    """Whether ``module.weight`` is one of torchao's tensor subclasses, not yet unwrapped. Other subclasses
    (PyTorch's 2:4 sparse tensors) are left alone, as torchao's own ``unwrap_tensor_subclass`` leaves them."""
    from torch.nn.utils import parametrize

    from efficiency.techniques.torchao_quant import is_torchao_tensor

    return is_torchao_tensor(getattr(module, "weight", None)) and not parametrize.is_parametrized(module, "weight")


def rebuild_untraceable(weight: torch.Tensor) -> str | None:
    """Why dynamo cannot trace the rebuild of ``weight``'s type from its inner tensors here, None when it can."""
    from torch.nn.utils import parametrize
    from torchao.utils import UnwrapTensorSubclass

    holder = torch.nn.Module()
    try:
        holder.weight = torch.nn.Parameter(weight, requires_grad=False)
        parametrize.register_parametrization(holder, "weight", UnwrapTensorSubclass())
        torch.compile(lambda: holder.weight, backend="eager", fullgraph=True)()
    except Exception as err:  # dynamo's Unsupported, or whatever the rebuild raised under it
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
    return None


def _keyword_completer(fn: Callable[..., Any], constants: dict[str, Any]) -> Callable[..., dict[str, Any]] | None:
    """A function mapping a call's (args, kwargs) of ``fn`` (a ``__new__`` or ``__init__``, first parameter
    skipped) to all its arguments as keywords, ``constants`` filling those not given. None when ``fn`` takes
    ``*args`` / ``**kwargs`` or lacks a constant's parameter: then its calls cannot be completed by name."""
    signature = inspect.signature(fn)
    params = list(signature.parameters.values())
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if not params or any(p.kind not in named for p in params[1:]) or \
            not set(constants) <= {p.name for p in params[1:]}:
        return None
    first = params[0].name

    def complete(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        arguments = dict(signature.bind_partial(None, *args, **kwargs).arguments)
        arguments.pop(first)
        for name, value in constants.items():
            arguments.setdefault(name, value)
        return arguments

    return complete


_CONSTANT_CLASSES: list[tuple[type, dict[str, Any], type]] = []


def constant_attribute_class(kind: type, constants: dict[str, Any]) -> type | None:
    """The subclass of torchao's tensor type ``kind`` whose optional attributes ``constants`` are class constants:
    left out of ``__tensor_flatten__``, filled in by the constructor when a call does not give them (torchao's own
    ops still pass every attribute, by position or by name). One class per kind and equal constants, so that the
    layers of a model share it (dynamo guards on the class: a class per layer would compile a graph per block).
    None when ``kind`` does not describe its attributes as torchao's base tensor does, or its constructor cannot be
    completed by name."""
    for known_kind, known, cls in _CONSTANT_CLASSES:
        if known_kind is kind and known.keys() == constants.keys() and all(known[k] == constants[k] for k in known):
            return cls
    optional = list(getattr(kind, "optional_tensor_attribute_names", None) or [])
    if not hasattr(kind, "tensor_data_names") or not set(constants) <= set(optional):
        return None
    base: Any = kind  # torchao's tensor class (typed loosely: its constructor and flatten are its own)
    complete_new = _keyword_completer(base.__new__, constants)
    complete_init = _keyword_completer(base.__init__, constants)
    if complete_new is None or complete_init is None:
        return None

    def __new__(cls: type, *args: Any, **kwargs: Any) -> Any:
        return base.__new__(cls, **complete_new(args, kwargs))

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, **complete_init(args, kwargs))

    def __tensor_flatten__(self: Any) -> tuple[list[str], dict[str, Any]]:
        names, attributes = base.__tensor_flatten__(self)
        return names, {k: v for k, v in attributes.items() if k not in constants}

    def __tensor_unflatten__(cls: Any, tensors: dict[str, Any], attributes: dict[str, Any], outer_size: Any,
                             outer_stride: Any) -> Any:
        # torchao's base tensor rebuilds the same way, asking for every optional attribute; the constants are not
        # in the flattened attributes, and the constructor fills them in.
        optional_tensors = {n: tensors.get(n) for n in getattr(cls, "optional_tensor_data_names", None) or ()}
        return cls(*[tensors[n] for n in cls.tensor_data_names], *[attributes[n] for n in cls.tensor_attribute_names],
                   **optional_tensors, **{n: attributes[n] for n in optional if n in attributes})

    cls = type(f"{kind.__name__}WithConstants", (kind,), {
        "__new__": __new__, "__init__": __init__, "__tensor_flatten__": __tensor_flatten__,
        "__tensor_unflatten__": classmethod(__tensor_unflatten__), "constant_attributes": dict(constants),
        "__module__": __name__, "__doc__": f"torchao's {kind.__name__} with {sorted(constants)} as class constants "
                                           "(efficiency.techniques.unwrap.constant_attribute_class)."})
    _CONSTANT_CLASSES.append((kind, dict(constants), cls))
    return cls


def with_constant_attributes(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` retyped to :func:`constant_attribute_class` of its type, its attributes that dynamo cannot pass to
    a call (:func:`is_plain`) as the class's constants; the same inner tensors, attribute values and kernels. None
    when it has no such attribute or its type cannot be retyped."""
    kind = type(weight)
    optional = list(getattr(kind, "optional_tensor_attribute_names", None) or [])
    constants = {n: getattr(weight, n) for n in optional if not is_plain(getattr(weight, n, None))}
    if not constants:
        return None
    cls = constant_attribute_class(kind, constants)
    if cls is None:
        return None
    names, attributes = weight.__tensor_flatten__()  # type: ignore[attr-defined]
    kept = {k: v for k, v in attributes.items() if k not in constants}
    rebuilt: torch.Tensor = cls.__tensor_unflatten__(  # type: ignore[attr-defined]
        {n: getattr(weight, n) for n in names}, kept, weight.size(), weight.stride())
    return rebuilt


def _rebuild_plan(weight: torch.Tensor) -> tuple[bool, str | None]:
    """(whether weights of this type are retyped first, :func:`with_constant_attributes`; why the type stays
    wrapped, None when its rebuild traces, as it is or retyped)."""
    why = rebuild_untraceable(weight)
    if why is None:
        return False, None
    retyped = with_constant_attributes(weight)
    if retyped is not None and rebuild_untraceable(retyped) is None:
        return True, None
    return False, why


def unwrap_weight_subclasses(model: Any) -> tuple[int, dict[str, str], dict[str, list[str]]]:
    """Pass torchao's quantised weights to the compiled graphs as their plain inner tensors, as
    ``torchao.utils.unwrap_tensor_subclass`` does (see the module's docstring for why), except that:

    - a weight type whose rebuild dynamo cannot trace is retyped with its unrecordable attributes as class
      constants (:func:`with_constant_attributes`), and stays wrapped when that does not trace either, with why;
    - the parametrized layers of one class share one parametrized class: ``parametrize`` makes a class per layer,
      dynamo guards on the class, and each decoder block of a regionally compiled pass became a graph of its own,
      until the case failed past the recompile limit (opt-1.3b int4wo, H200).

    Returns (weights unwrapped, {weight type: why it stayed wrapped}, {weight type: its attributes held as class
    constants})."""
    from torch.nn.utils import parametrize

    layers = [m for m in model.modules() if subclass_weight(m)]
    if not layers:
        return 0, {}, {}
    from torchao.utils import UnwrapTensorSubclass

    plans: dict[type, tuple[bool, str | None]] = {}  # weight type -> _rebuild_plan
    constants: dict[str, list[str]] = {}
    shared_class: dict[tuple[Any, ...], type] = {}
    unwrapped = 0
    for layer in layers:
        kind = type(layer.weight)
        if kind not in plans:
            plans[kind] = _rebuild_plan(layer.weight)
        retype, why = plans[kind]
        if why is not None:
            continue
        weight = with_constant_attributes(layer.weight) if retype else None
        if weight is not None:  # None: this layer has no such attribute, and its weight rebuilds as it is
            layer.weight = torch.nn.Parameter(weight, requires_grad=False)
            constants[kind.__name__] = sorted(weight.constant_attributes)  # type: ignore[attr-defined]
        parametrize.register_parametrization(layer, "weight", UnwrapTensorSubclass())
        key = (type(layer).__bases__, tuple(layer.parametrizations.keys()))
        layer.__class__ = shared_class.setdefault(key, type(layer))
        unwrapped += 1
    return unwrapped, {kind.__name__: why for kind, (_, why) in plans.items() if why is not None}, constants
