"""Runs the ScaleQuest stages in order from a pipeline config, resuming where an earlier run stopped.

Each stage writes its output under the output directory (``qft-data.jsonl``, ``qft/``, ``qpo-pairs.jsonl``,
``qpo/``, ``generate.jsonl``, ``filter-language.jsonl``, ``filter-solvable.jsonl``, ``difficulty.jsonl``,
``respond.jsonl``, ``reward-select.jsonl``, ``decontaminate.jsonl`` = the final dataset), each with its
``.rejects.jsonl`` and ``.stats.json``. A stage whose stats file carries the fingerprint of its current inputs,
settings and models is complete and is skipped; any change (a setting, a prompt, an upstream result) reruns it and
everything after it, and the generation cache keeps reruns cheap. ``pipeline.stats.json`` collects every stage's
stats.

Example::

    from swift_callbacks.builders.scalequest import run_pipeline

    stats = run_pipeline("recipes/scalequest/pipeline_tiny_cpu.yaml", "runs/scalequest-tiny")
    stats["filter-solvable"].metrics["solvable_ratio"]
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .backends import generation_backend
from .config import STAGE_DEFS, STAGE_ORDER, PipelineConfig, StageConfig, load_pipeline_config
from .contract import StageError, StageResult, StageStats, is_complete, load_stats, write_json
from .contract import fingerprint as make_fingerprint
from .models import ConfigError, ModelSpec, load_tokenizer, resolve_stage_model
from .prompts import Prompts
from .settings import settings_dict


@dataclass
class StageRun:
    """Everything one stage run needs, resolved.

    Attributes:
        name: Stage name.
        config: Its settings and models (``stage:`` models already resolved).
        input: Input file or folder, or None.
        output: Output file or folder.
        cache_dir: The generation cache directory.
        prompts: The prompt templates.
        fingerprint: The run's fingerprint.
    """

    name: str
    config: StageConfig
    input: Path | None
    output: Path
    cache_dir: Path | None
    prompts: Prompts
    fingerprint: str = ""

    def model(self, role: str) -> ModelSpec:
        spec = self.config.models.get(role)
        if spec is None:
            raise StageError(f"{self.name}: no model given for role {role!r}")
        return spec


def run_pipeline(
    config_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    stages: Sequence[str] | None = None,
    *,
    stream: IO[str] | None = None,
) -> dict[str, StageStats]:
    """Runs the pipeline's stages in order, skipping those already complete.

    Args:
        config_path: The pipeline config (YAML).
        output_dir: Where every stage's outputs go.
        stages: Run only these stages (their inputs must exist from an earlier run); default all.
        stream: Where progress and summaries are printed (default stdout).

    Returns:
        The stats of every stage run or skipped, by stage name.

    Raises:
        ConfigError: An invalid config, or an unknown stage name.
        StageError: A stage cannot run (missing input, nothing to train on, ...).
    """
    stream = stream or sys.stdout
    config = load_pipeline_config(config_path)
    selected = _selection(stages)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = _cache_dir(config, out)
    all_stats: dict[str, StageStats] = {}
    for name in STAGE_ORDER:
        if name not in selected:
            continue
        run = _prepare(name, config, out, cache_dir)
        if is_complete(run.output, run.fingerprint):
            stats = load_stats(run.output)
            print(f"[{name}] complete, skipped ({run.output})", file=stream, flush=True)
        else:
            stats = execute_stage(run, stream=stream).stats
        all_stats[name] = stats
    write_json(out / "pipeline.stats.json", {name: s.to_dict() for name, s in all_stats.items()})
    print("\n".join(summary_table(all_stats)), file=stream, flush=True)
    return all_stats


def _selection(stages: Sequence[str] | None) -> set[str]:
    if stages is None:
        return set(STAGE_ORDER)
    unknown = [s for s in stages if s not in STAGE_DEFS]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; the stages are {', '.join(STAGE_ORDER)}")
    return set(stages)


def _cache_dir(config: PipelineConfig, out: Path) -> Path:
    if config.cache_dir is None:
        return out / "cache"
    return config.cache_dir if config.cache_dir.is_absolute() else config.path.parent / config.cache_dir


def stage_output(name: str, out: Path) -> Path:
    """Where stage ``name`` writes in the output directory ``out``."""
    return out / STAGE_DEFS[name].output


def _prepare(name: str, config: PipelineConfig, out: Path, cache_dir: Path) -> StageRun:
    stage = STAGE_DEFS[name]
    section = config.stages[name]
    models = {role: _resolve(spec, out, name) for role, spec in section.models.items()}
    section = dataclasses.replace(section, models=models)
    source = section.input or (stage_output(stage.input_from, out) if stage.input_from else None)
    if source is not None and not source.exists():
        hint = f"run stage {stage.input_from!r} first" if stage.input_from and not section.input else "check the path"
        raise StageError(f"{name}: input {str(source)!r} does not exist; {hint}")
    run = StageRun(name, section, source, stage_output(name, out), cache_dir, config.prompts)
    run.fingerprint = stage_fingerprint(run)
    return run


def stage_fingerprint(run: StageRun) -> str:
    """The fingerprint of a prepared stage run: settings, prompts (where used), input and model identities."""
    stage = STAGE_DEFS[run.name]
    payload = {"settings": settings_dict(run.config.settings), "prompts": run.prompts if stage.uses_prompts else None}
    identities = sorted((role, spec.identity()) for role, spec in run.config.models.items() if spec is not None)
    # Every file a stage reads belongs in its fingerprint by content: its input and the files its settings name
    # (the evaluation sets of decontaminate); model folders are covered by their identities.
    inputs = ([run.input] if run.input else []) + settings_files(run.config.settings)
    return make_fingerprint(run.name, payload, inputs, [f"{r}={i}" for r, i in identities])


def settings_files(settings: Any) -> list[str]:
    """The files named in stage settings: every ``path`` field of a (nested) settings dataclass, in order."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                item = getattr(value, f.name)
                if f.name == "path" and isinstance(item, (str, os.PathLike)):
                    found.append(os.fspath(item))
                else:
                    walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    walk(settings)
    return found


def _resolve(spec: ModelSpec | None, out: Path, stage: str) -> ModelSpec | None:
    if spec is None or spec.backend != "stage":
        return spec
    if spec.model not in STAGE_DEFS or not STAGE_DEFS[spec.model].training:
        raise ConfigError(f"stages.{stage}: 'stage:{spec.model}' must name a training stage (qft or qpo)")
    folder = stage_output(spec.model, out)
    stats = load_stats(folder)
    if stats is None or not folder.is_dir():
        raise StageError(f"{stage} uses the model of stage {spec.model!r}, which has not run yet ({folder})")
    return resolve_stage_model(spec, folder, stats.fingerprint)


# ------------------------------------------------------------------------------------------------ executing


def execute_stage(run: StageRun, *, stream: IO[str] | None = None) -> StageResult:
    """Runs one prepared stage (the runner and the per-stage commands both end here).

    Returns:
        The stage result.
    """
    print(f"[{run.name}] running -> {run.output}", file=stream or sys.stdout, flush=True)
    with ExitStack() as stack:
        result = _EXECUTORS[run.name](run, stack)
    if "torch" in sys.modules:  # release the stage's models before the next one loads its own
        from .training import free_memory

        free_memory()
    return result


def _generator(run: StageRun, stack: ExitStack, role: str, spec: ModelSpec | None = None) -> Any:
    from ...generation.runner import Generator

    backend = generation_backend(spec or run.model(role))
    return stack.enter_context(Generator(backend, run.cache_dir, desc=f"{run.name}:{role}"))


def _qft_data(run: StageRun, stack: ExitStack) -> StageResult:
    from .qft import qft_data

    tokenizer = load_tokenizer(run.model("model"))
    return qft_data(run.input, run.output, tokenizer=tokenizer, settings=run.config.settings,
                    fingerprint=run.fingerprint)  # fmt: skip


def _qft(run: StageRun, stack: ExitStack) -> StageResult:
    from .qft import train_qft

    return train_qft(run.input, run.output, model=run.model("model"), training=run.config.settings.training,
                     fingerprint=run.fingerprint)  # fmt: skip


def _qpo(run: StageRun, stack: ExitStack) -> StageResult:
    from .qpo import train_qpo

    return train_qpo(run.input, run.output, model=run.model("model"), training=run.config.settings.training,
                     fingerprint=run.fingerprint)  # fmt: skip


def _qpo_pairs(run: StageRun, stack: ExitStack) -> StageResult:
    from .generate import chat_prefix, training_prompt
    from .qpo import qpo_pairs

    settings = run.config.settings
    tokenizer = load_tokenizer(run.model("model"))
    prefix = chat_prefix(tokenizer, settings.system_prompt)
    return qpo_pairs(
        run.output, sampler=_generator(run, stack, "model"), rewriter=_generator(run, stack, "rewriter"),
        prefix=prefix, prompt=training_prompt(tokenizer, prefix), eos_token=tokenizer.eos_token, settings=settings,
        prompts=run.prompts, fingerprint=run.fingerprint,
    )  # fmt: skip


def _generate(run: StageRun, stack: ExitStack) -> StageResult:
    from .generate import chat_prefix, generate_questions

    settings = run.config.settings
    spec = run.model("model")
    prefix = chat_prefix(load_tokenizer(spec), settings.system_prompt)
    return generate_questions(run.output, generator=_generator(run, stack, "model"), prefix=prefix,
                              settings=settings, model_id=spec.identity(), fingerprint=run.fingerprint)  # fmt: skip


def _filter_language(run: StageRun, stack: ExitStack) -> StageResult:
    from .filters import filter_language

    return filter_language(run.input, run.output, settings=run.config.settings, fingerprint=run.fingerprint)


def _filter_solvable(run: StageRun, stack: ExitStack) -> StageResult:
    from .filters import filter_solvable

    return filter_solvable(run.input, run.output, judge=_generator(run, stack, "judge"), settings=run.config.settings,
                           prompts=run.prompts, fingerprint=run.fingerprint)  # fmt: skip


def _difficulty(run: StageRun, stack: ExitStack) -> StageResult:
    from .difficulty import difficulty

    settings = run.config.settings
    solver_spec = run.config.models.get("solver")
    solver = (
        _generator(run, stack, "solver", solver_spec) if solver_spec is not None and settings.scorer.train else None
    )
    return difficulty(run.input, run.output, solver=solver, scorer_model=run.model("scorer_model"),
                      cache_dir=run.cache_dir, settings=settings, prompts=run.prompts,
                      fingerprint=run.fingerprint)  # fmt: skip


def _respond(run: StageRun, stack: ExitStack) -> StageResult:
    from .respond import respond

    return respond(run.input, run.output, responder=_generator(run, stack, "model"), settings=run.config.settings,
                   prompts=run.prompts, fingerprint=run.fingerprint)  # fmt: skip


def _reward_select(run: StageRun, stack: ExitStack) -> StageResult:
    from ...generation.runner import Generator
    from .backends import score_backend
    from .respond import reward_select

    backend = score_backend(run.model("reward_model"), text_format="chat")
    scorer = stack.enter_context(Generator(backend, run.cache_dir, desc="reward-select:reward_model"))
    return reward_select(run.input, run.output, scorer=scorer, settings=run.config.settings,
                         fingerprint=run.fingerprint)  # fmt: skip


def _decontaminate(run: StageRun, stack: ExitStack) -> StageResult:
    from .decontaminate import decontaminate

    return decontaminate(run.input, run.output, settings=run.config.settings, fingerprint=run.fingerprint)


_EXECUTORS: dict[str, Callable[[StageRun, ExitStack], StageResult]] = {
    "qft-data": _qft_data, "qft": _qft, "qpo-pairs": _qpo_pairs, "qpo": _qpo, "generate": _generate,
    "filter-language": _filter_language, "filter-solvable": _filter_solvable, "difficulty": _difficulty,
    "respond": _respond, "reward-select": _reward_select, "decontaminate": _decontaminate,
}  # fmt: skip


def summary_table(all_stats: dict[str, StageStats]) -> list[str]:
    """One line per stage: units in and out, drops, and the stage's headline number."""
    lines = ["", f"{'stage':<16} {'unit':<18} {'in':>8} {'out':>8} {'dropped':>8}  headline"]
    for name, stats in all_stats.items():
        lines.append(f"{name:<16} {stats.unit:<18} {stats.rows_in:>8} {stats.rows_out:>8} {stats.dropped_total:>8}  "
                     f"{_headline(stats)}")  # fmt: skip
    return lines


_HEADLINES = {
    "filter-solvable": "solvable_ratio", "respond": "answer_presence_ratio",
    "decontaminate": "contamination_ratio", "qpo-pairs": "pair_ratio", "qft": "train_loss", "qpo": "train_loss",
}  # fmt: skip


def _headline(stats: StageStats) -> str:
    if stats.stage == "filter-language":
        return "-" if stats.kept_ratio is None else f"kept_ratio {stats.kept_ratio:.4g}"
    key = _HEADLINES.get(stats.stage)
    if key is not None:
        value = stats.metrics.get(key)
        return f"{key} {value:.4g}" if isinstance(value, (int, float)) else f"{key} {value}"
    if stats.stage == "difficulty":
        return f"dropped easiest {stats.metrics.get('dropped_easiest')}, labelled {stats.metrics.get('labelled')}"
    if stats.stage == "reward-select":
        mean = (stats.metrics.get("reward_selected") or {}).get("mean")
        return f"selected reward mean {mean:.4g}" if isinstance(mean, float) else "selected reward mean -"
    return ""
