"""The pipeline config: one YAML file naming the models and the settings of every stage.

Layout (``recipes/scalequest/pipeline_tiny_cpu.yaml`` is a complete example)::

    models:                       # optional named model specs, referred to by name below
      teacher: {backend: openai, base_url: http://127.0.0.1:8000/v1, model: Qwen/Qwen2.5-72B-Instruct}
    prompts: {}                   # optional template overrides (see prompts.Prompts)
    cache_dir: null               # generation cache; default <output_dir>/cache
    stages:
      qft-data: {input: data/seed.jsonl, question_field: question}
      qft: {model: Qwen/Qwen2-Math-7B-Instruct, training: {per_device_train_batch_size: 8}}
      qpo-pairs: {rewriter: teacher, num_questions: 10000}
      ...

A stage section holds the stage's settings (see each stage's settings class; its defaults are the paper's), its
model roles (a name from ``models`` or an inline spec, see :mod:`.models`) and optionally ``input`` (default:
the previous stage's output). Every key is checked: an unknown key is an error naming its full path
(``stages.respond.samplng: unknown key; did you mean 'sampling'?``), and so are a missing required model, a wrong
type, an unknown trainer argument under ``training``, and a local file (``input``, an evaluation set) that does
not exist. Relative paths are resolved against the config file's folder first, then the working directory. What
each stage section may hold is declared by the stage's class (:mod:`.stages`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...configuration import ConfigError, build, check_keys, join, load_yaml, require_mapping
from .models import ModelSpec
from .prompts import Prompts
from .stages import OPTIONAL, REQUIRED, STAGE_ORDER, STAGES, Stage
from .stages.base import resolve_input

TOP_KEYS = ["models", "prompts", "cache_dir", "stages"]


@dataclass
class StageConfig:
    """One stage's part of the config, checked and resolved."""

    settings: Any
    models: dict[str, ModelSpec | None]
    input: Path | None = None


@dataclass
class PipelineConfig:
    """A checked pipeline config."""

    path: Path
    stages: dict[str, StageConfig]
    prompts: Prompts = field(default_factory=Prompts)
    cache_dir: Path | None = None


def load_pipeline_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Reads and checks a pipeline config file.

    Args:
        path: The YAML file.
        overrides: ``KEY.PATH=VALUE`` assignments applied first (``stages.respond.n=8``,
            ``stages.decontaminate.eval_sets[0].name=gsm8k``).

    Raises:
        ConfigError: Anything wrong in it (the message starts with the key path), or an unreadable file.
    """
    return parse_pipeline_config(load_yaml(path, overrides), path)


def parse_pipeline_config(data: Any, path: str | os.PathLike = "pipeline.yaml") -> PipelineConfig:
    """Checks config data already read from YAML (``path`` locates relative paths).

    Raises:
        ConfigError: Anything wrong in it.
    """
    path = Path(path)
    require_mapping(data, "")
    check_keys(data, TOP_KEYS, "")
    models = _named_models(data.get("models"))
    prompts = build(Prompts, data.get("prompts"), "prompts")
    sections = require_mapping(data.get("stages") or {}, "stages")
    check_keys(sections, STAGE_ORDER, "stages")
    base = path.parent
    stages = {name: stage_config(stage, sections.get(name), models, sections, base)
              for name, stage in STAGES.items()}  # fmt: skip
    cache_dir = data.get("cache_dir")
    if cache_dir is not None and not isinstance(cache_dir, str):
        raise ConfigError(f"cache_dir: expected a path string, got {type(cache_dir).__name__}")
    return PipelineConfig(path, stages, prompts, Path(cache_dir) if cache_dir else None)


def _named_models(data: Any) -> dict[str, ModelSpec]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"models: expected a mapping of names to model specs, got {type(data).__name__}")
    return {str(name): ModelSpec.parse(value, f"models.{name}") for name, value in data.items()}


def stage_config(
    stage: Stage,
    section: Any,
    models: Mapping[str, ModelSpec] | None = None,
    sections: Mapping[str, Any] | None = None,
    base: Path = Path("."),
) -> StageConfig:
    """One stage's section: settings (built and checked by the kernel), model roles, and ``input``.

    Args:
        stage: The stage.
        section: Its section (a mapping; None: all defaults).
        models: The config's named models.
        sections: Every stage's section (for role defaults taken from another stage).
        base: The config's folder (relative paths).

    Raises:
        ConfigError: Anything wrong in the section.
    """
    path = f"stages.{stage.name}"
    section = require_mapping({} if section is None else section, path)
    check_keys(section, [*(f.name for f in dataclasses.fields(stage.settings)), *stage.roles, "input"], path)
    settings_data = {k: v for k, v in section.items() if k not in stage.roles and k != "input"}
    settings = build(stage.settings, settings_data, path)
    stage.check(settings, path)
    settings = stage.resolve_paths(settings, base, path)
    specs = {role: _role(stage, role, section, models or {}, sections or {}, path) for role in stage.roles}
    value = section.get("input")
    if value is None and stage.input_required:
        raise ConfigError(f"{path}.input: required (the data the stage starts from)")
    return StageConfig(settings, specs, None if value is None else resolve_input(value, base, path))


def _role(
    stage: Stage,
    role: str,
    section: Mapping[str, Any],
    models: Mapping[str, ModelSpec],
    sections: Mapping[str, Any],
    path: str,
) -> ModelSpec | None:
    value = section.get(role)
    if value is None:
        value = stage.default_role(role, sections)
        if value == REQUIRED:
            raise ConfigError(f"{join(path, role)}: required (a model name from 'models' or a model spec)")
        if value in (REQUIRED, OPTIONAL):
            return None
    if isinstance(value, str) and value in models:
        return models[value]
    return ModelSpec.parse(value, join(path, role))
