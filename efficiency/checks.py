"""The inputs of a run, checked before any model loads: what needs no pytest, called by the plugin
(``plugin.check_before_loading``, which adds the checks of a pytest run: xdist device sharing, outputs) and by
``api.measure_case``, so that both refuse the same input with the same message (a ``ConfigError``).

Light: nothing heavy is imported at module level; each check imports what it reads.
"""

from __future__ import annotations

import importlib.util

from efficiency.config import ConfigError, SuiteConfig

__all__ = ["check_before_loading"]


def check_before_loading(cfg: SuiteConfig) -> None:
    """Every input of ``cfg`` (canonical technique names: ``settings.canonical_config``) that can be judged without
    loading a model: techniques and their options, model names, the serving prompts against the token budget, the
    generation workloads against each model's positions, the evaluation text, the calibration file and the lm-eval
    tasks. Raises ConfigError naming what is wrong."""
    _check_techniques(cfg)
    _check_models(cfg)
    _check_token_budget(cfg)
    _check_sequence_lengths(cfg)
    from efficiency.data import check_inputs

    wl = cfg.workload
    check_inputs(wl.dataset, cfg.data_dir, min(wl.context, wl.max_tokens or wl.context))
    if cfg.calibration_path is not None and not cfg.calibration_path.is_file():
        raise ConfigError(f"calibration file {cfg.calibration_path} does not exist")
    if cfg.tasks.enabled:
        _check_tasks(cfg)


def _check_techniques(cfg: SuiteConfig) -> None:
    from efficiency.techniques.base import UnknownTechnique, parse

    for name, options in cfg.technique_options.items():  # the thresholds' names were read by canonical_config
        try:  # with its options: a typo in the table of a technique outside this run's grid is refused too
            parse(name, {name: options})
        except UnknownTechnique as err:
            raise ConfigError(str(err)) from err
    for name in (cfg.baseline, *cfg.techniques):  # with the options: a bad option key is refused up front too
        try:
            parse(name, cfg.technique_options)
        except UnknownTechnique as err:
            raise ConfigError(str(err)) from err


def _check_models(cfg: SuiteConfig) -> None:
    from efficiency.models import unknown_model_message

    model_dirs = (cfg.model_dir,) if cfg.model_dir else ()
    for name in cfg.models:
        message = unknown_model_message(name, model_dirs)
        if message:
            raise ConfigError(message)


def _check_token_budget(cfg: SuiteConfig) -> None:
    """The serving prompts are cut from the evaluation tokens, at most ``--eff-max-tokens`` of them; a budget
    that cannot hold one prompt (measure.serving.short_text, the phase's own rule) is known before loading. The
    whole split (``all``) is not: its length in tokens needs the model's tokenizer."""
    from efficiency.measure.serving import short_text

    serving, budget = cfg.serving, cfg.workload.max_tokens
    if not serving.enabled or budget is None:
        return
    problem = short_text(serving.input_tokens, budget, f" at most (--eff-max-tokens {budget})")
    if problem:
        raise ConfigError(f"{problem}: lower --eff-input-tokens to at most {budget} or raise --eff-max-tokens")


def _check_sequence_lengths(cfg: SuiteConfig) -> None:
    """The generation workloads fit the positions of each model whose positions are known without loading it
    (models.positions_up_front: a local config, one fetched alone from the hub, or SmolLM2's pinned GGUF); else the
    model loads and the latency (or serving) phase fails on it, leaving the case without those figures."""
    from efficiency.models import positions_up_front

    wl = cfg.workload
    model_dirs = (cfg.model_dir,) if cfg.model_dir else ()
    for name in cfg.models:
        positions = positions_up_front(name, model_dirs, cfg.random_weights, cfg.cache_dir)
        if positions is None:
            continue
        prompt = wl.prompt_tokens(positions)  # the latency phases' own rule
        if prompt + wl.decode_tokens > positions:
            half = positions // 2
            example = (f"--eff-prefill-tokens {positions - wl.decode_tokens}" if wl.decode_tokens < positions
                       else f"--eff-prefill-tokens {positions - half} --eff-decode-tokens {half}")
            raise ConfigError(f"model {name!r} takes at most {positions} positions, but the latency workload needs "
                              f"{prompt} prompt tokens (--eff-prefill-tokens, capped at --eff-context and "
                              f"--eff-max-tokens) + {wl.decode_tokens} generated (--eff-decode-tokens) = "
                              f"{prompt + wl.decode_tokens}: lower them to at most {positions} together "
                              f"(e.g. {example})")
        serving = cfg.serving
        if serving.enabled and serving.input_tokens + serving.output_tokens > positions:
            raise ConfigError(f"model {name!r} takes at most {positions} positions, but the serving sweep needs "
                              f"{serving.input_tokens} input tokens (--eff-input-tokens) + {serving.output_tokens} "
                              f"output tokens (--eff-output-tokens) = {serving.input_tokens + serving.output_tokens}"
                              ": lower either")


def _check_tasks(cfg: SuiteConfig) -> None:
    """The lm-eval tasks resolve (lm-eval installed, every name in --eff-tasks-dir or lm-eval's registry) before
    any model loads; else the task phase of every case would fail after its model loaded."""
    names = ", ".join(cfg.tasks.tasks)
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"tasks {names} (--eff-tasks / [tool.efficiency] tasks) need lm-evaluation-harness, "
                          "which is not installed: pip install 'pytest-efficiency[quality]'")
    from efficiency.measure.tasks import TaskUnavailable, task_manager

    try:
        task_manager(cfg.tasks.tasks, cfg.tasks.tasks_dir)  # cached: the cases' task phases reuse it
    except TaskUnavailable as err:
        raise ConfigError(str(err)) from err
