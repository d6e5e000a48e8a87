"""Every default value of the suite, in one place. Settings, config objects, the CLI and the gates read them here.

Workload defaults differ by device: ``WORKLOAD["cpu"]`` / ``WORKLOAD["gpu"]``, keyed by the option names of
``[tool.efficiency]`` (``max-tokens``, ``rounds``, ...); ``[tool.efficiency.cpu]`` / ``[tool.efficiency.gpu]``
override them per device in a project's pyproject.toml.
"""

from __future__ import annotations

from typing import Any

MODELS: tuple[str, ...] = ("smollm2-135m",)
DATASET = "wikitext2"

# Float dtypes by name: the precision techniques, ``--eff-compute-dtype`` and ``@DTYPE`` of quantisers
# (techniques/precision.py maps them to torch dtypes; the settings check names without importing torch).
COMPUTE_DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16")

# Per device: the grid and the workload. ``max-tokens`` None = the whole test split.
WORKLOAD: dict[str, dict[str, Any]] = {
    "cpu": {
        "techniques": ["fp32", "bf16", "bnb8", "bnb4"],
        "baseline": "fp32",
        "context": 512,
        "stride": 512,
        "max-tokens": 2048,
        "batch-size": 4,
        "prefill-tokens": 128,
        "decode-tokens": 16,
        "rounds": 3,
        "min-window": 10.0,
    },
    "gpu": {
        "techniques": ["fp16", "bf16", "bnb8", "bnb4"],
        "baseline": "fp16",
        "context": 1024,
        "stride": 512,
        "max-tokens": None,
        "batch-size": "auto",  # from the model size and free memory: 7.5x-10.75x the HF recipe on an H100 (results §5)
        "prefill-tokens": 128,
        "decode-tokens": 16,
        "rounds": 3,
        "min-window": 10.0,
    },
}

# Minimum energy window in seconds; used only when a real meter (RAPL, NVML) reads the primary energy.
MIN_WINDOW_S = 10.0

# Maximum perplexity increase in percent over the model's baseline before a case fails (per technique in
# [tool.efficiency.thresholds]).
THRESHOLD_PCT = 25.0
# Built-in limits of steps that change how a model runs, not its weights, under the user's thresholds table: what
# they may add to a pipeline's limit is float rounding, not a quality loss. Without it `compile` added the default
# 25 points, so int4wo-g64+compile passed the gate at +36% where int4wo-g64 failed (docs/results.md section 5k).
STEP_THRESHOLDS_PCT: dict[str, float] = {"compile": 1.0}

# Regression verdicts (efficiency compare / gate, --eff-fail-on-regression): practical thresholds and the
# significance level of the statistical test.
REGRESSION_THRESHOLD_PCT = 5.0  # runtime and energy
PERPLEXITY_COMPARE_PCT = 1.0
INFO_COMPARE_PCT = 5.0  # latency, memory, size (reported, not gated)
ALPHA = 0.05

# The energy window never runs more timed rounds than this; the report says when the cap binds.
MAX_ROUNDS = 1000

CACHE_DIRNAME = "pytest-efficiency"  # under $XDG_CACHE_HOME or ~/.cache
REPORTS_DIRNAME = "reports"  # under the rootdir
HISTORY_FILENAME = "history.sqlite"  # under the reports folder

# Machine load above which a run is flagged busy (report/env.busy_warning).
BUSY_LOAD_PER_CPU = 0.5  # 1-minute load average per logical CPU, beyond this run's own threads
BUSY_OTHER_CPU_PCT = 20.0  # CPU share of other processes, percent of one CPU

# Quality beyond perplexity and serving (efficiency/phases/quality_settings.py).
DEFAULT_KLD_TOKENS = 4096  # KL divergence against the baseline on the first N evaluation tokens (0: off)
DEFAULT_KLD_TOP_K = 4096  # baseline log-probs kept per token, plus one bin for the rest (measure/kld.py)
DEFAULT_INPUT_TOKENS = 128  # serving sweep: prompt length
DEFAULT_OUTPUT_TOKENS = 64  # serving sweep: generated tokens per sequence
