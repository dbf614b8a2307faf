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
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from ...configuration import ConfigError, join
from .config import PipelineConfig, load_pipeline_config
from .contract import StageError, StageResult, StageStats, generation_failed, is_complete, load_stats, write_json
from .contract import fingerprint as make_fingerprint
from .models import ModelSpec, resolve_stage_model
from .settings import settings_dict
from .stages import STAGE_ORDER, STAGES, StageRun
from .training import free_memory


def run_pipeline(
    config_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    stages: Sequence[str] | None = None,
    *,
    stream: IO[str] | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, StageStats]:
    """Runs the pipeline's stages in order, skipping those already complete.

    Args:
        config_path: The pipeline config (YAML).
        output_dir: Where every stage's outputs go.
        stages: Run only these stages (their inputs must exist from an earlier run); default all.
        stream: Where progress and summaries are printed (default stdout).
        overrides: ``KEY.PATH=VALUE`` assignments over the config (``stages.respond.n=8``).

    Returns:
        The stats of every stage run or skipped, by stage name.

    Raises:
        ConfigError: An invalid config, or an unknown stage name.
        StageError: A stage cannot run (missing input, nothing to train on, ...).
    """
    stream = stream or sys.stdout
    config = load_pipeline_config(config_path, tuple(overrides))
    selected = _selection(stages)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = _cache_dir(config, out)
    check_inputs(config, out, selected)
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
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; the stages are {', '.join(STAGE_ORDER)}")
    return set(stages)


def check_inputs(config: PipelineConfig, out: Path, selected: set[str]) -> None:
    """Checks, before any stage runs, that every file the selected stages read exists: a configured ``input`` may
    also be written by an earlier stage of this run.

    Raises:
        ConfigError: ``stages.<name>.input: file ... not found`` (or the settings key naming the file).
    """
    produced: set[Path] = set()
    for name in (n for n in STAGE_ORDER if n in selected):
        source = config.stages[name].input
        reads = STAGES[name].input_from
        if source is None and reads is not None:
            implicit = stage_output(reads, out)
            if not implicit.exists() and implicit.resolve() not in produced:
                raise ConfigError(f"stages.{name}: reads the output of stage {reads!r} ({implicit}), which does not "
                                  f"exist and no earlier stage of this run writes it; run {reads!r} first or set "
                                  f"stages.{name}.input")  # fmt: skip
        if source is not None and not source.exists() and source.resolve() not in produced:
            raise ConfigError(f"stages.{name}.input: file {str(source)!r} not found (and no earlier stage of this "
                              "run writes it)")  # fmt: skip
        for where, file in settings_files(config.stages[name].settings, f"stages.{name}"):
            if not Path(file).exists():
                raise ConfigError(f"{where}: file {file!r} not found")
        produced.add(stage_output(name, out).resolve())


def _cache_dir(config: PipelineConfig, out: Path) -> Path:
    if config.cache_dir is None:
        return out / "cache"
    return config.cache_dir if config.cache_dir.is_absolute() else config.path.parent / config.cache_dir


def stage_output(name: str, out: Path) -> Path:
    """Where stage ``name`` writes in the output directory ``out``."""
    return out / STAGES[name].output_name


def _prepare(name: str, config: PipelineConfig, out: Path, cache_dir: Path) -> StageRun:
    stage = STAGES[name]
    section = config.stages[name]
    models = {role: _resolve(spec, out, name) for role, spec in section.models.items()}
    source = section.input or (stage_output(stage.input_from, out) if stage.input_from else None)
    if source is not None and not source.exists():
        hint = f"run stage {stage.input_from!r} first" if stage.input_from and not section.input else "check the path"
        raise StageError(f"{name}: input {str(source)!r} does not exist; {hint}")
    run = StageRun(stage, section.settings, models, source, stage_output(name, out), cache_dir, config.prompts)
    run.fingerprint = stage_fingerprint(run)
    return run


def stage_fingerprint(run: StageRun) -> str:
    """The fingerprint of a prepared stage run: settings, prompts (where used), input and model identities."""
    payload = {"settings": settings_dict(run.settings), "prompts": run.prompts if run.stage.uses_prompts else None}
    identities = sorted((role, spec.identity()) for role, spec in run.models.items() if spec is not None)
    # Every file a stage reads belongs in its fingerprint by content: its input and the files its settings name
    # (the evaluation sets of decontaminate); model folders are covered by their identities.
    inputs = ([run.input] if run.input else []) + [file for _, file in settings_files(run.settings)]
    return make_fingerprint(run.name, payload, inputs, [f"{r}={i}" for r, i in identities])


def settings_files(settings: Any, path: str = "") -> list[tuple[str, str]]:
    """The files named in stage settings: every ``path`` field of a (nested) settings dataclass, in order, as
    ``(key path, file)``."""
    found: list[tuple[str, str]] = []

    def walk(value: Any, where: str) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                item = getattr(value, f.name)
                if f.name == "path" and isinstance(item, (str, os.PathLike)):
                    found.append((join(where, f.name), os.fspath(item)))
                else:
                    walk(item, join(where, f.name))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, join(where, i))
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, join(where, str(key)))

    walk(settings, path)
    return found


def _resolve(spec: ModelSpec | None, out: Path, stage: str) -> ModelSpec | None:
    if spec is None or spec.backend != "stage":
        return spec
    if spec.model not in STAGES or not STAGES[spec.model].trainer:
        trainers = " or ".join(name for name, s in STAGES.items() if s.trainer)
        raise ConfigError(f"stages.{stage}: 'stage:{spec.model}' must name a training stage ({trainers})")
    folder = stage_output(spec.model, out)
    stats = load_stats(folder)
    if stats is None or not folder.is_dir():
        raise StageError(f"{stage} uses the model of stage {spec.model!r}, which has not run yet ({folder})")
    return resolve_stage_model(spec, folder, stats.fingerprint)


def execute_stage(run: StageRun, *, stream: IO[str] | None = None) -> StageResult:
    """Runs one prepared stage (the runner and the per-stage commands both end here).

    Returns:
        The stage result.
    """
    print(f"[{run.name}] running -> {run.output}", file=stream or sys.stdout, flush=True)
    with ExitStack() as stack:
        result = run.stage.run(run, stack)
    if "torch" in sys.modules:  # release the stage's models before the next one loads its own
        free_memory()
    failed = generation_failed(result.stats)
    if failed and not result.stats.rows_out:  # nothing to hand on: the next stage would build on an empty file
        example = next((r.detail for r in result.rejects if r.stage == "generate" and r.detail), "")
        raise StageError(
            f"stage {run.name}: every generation request failed{f' (e.g. {example})' if example else ''}; "
            "it is not complete. Rerun when the backend answers: answers already received come from the cache."
        )
    return result


def summary_table(all_stats: dict[str, StageStats]) -> list[str]:
    """One line per stage: units in and out, drops, and the stage's headline number."""
    lines = ["", f"{'stage':<16} {'unit':<18} {'in':>8} {'out':>8} {'dropped':>8}  headline"]
    for name, stats in all_stats.items():
        headline = STAGES[name].headline(stats) if name in STAGES else ""
        lines.append(f"{name:<16} {stats.unit:<18} {stats.rows_in:>8} {stats.rows_out:>8} {stats.dropped_total:>8}  "
                     f"{headline}")  # fmt: skip
    return lines
