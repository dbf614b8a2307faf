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
type, and an unknown trainer argument under ``training``. Relative paths are resolved against the config file's
folder first, then the working directory.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .decontaminate import DecontaminateSettings
from .difficulty import DifficultySettings
from .filters import LanguageSettings, SolvableSettings
from .generate import GenerateSettings
from .models import ConfigError, ModelSpec
from .prompts import Prompts
from .qft import QftDataSettings
from .qpo import QpoPairsSettings
from .respond import RespondSettings, RewardSettings
from .settings import build_settings, check_keys, join

REQUIRED = "<required>"
OPTIONAL = "<optional>"
TOP_KEYS = ["models", "prompts", "cache_dir", "stages"]


@dataclass(frozen=True)
class TrainingSettings:
    """Settings of a training stage.

    Attributes:
        training: Trainer-argument overrides (``trl.SFTConfig`` for ``qft``, ``trl.DPOConfig`` for ``qpo``).
    """

    training: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageDef:
    """What the pipeline knows about a stage.

    Attributes:
        name: Stage (and command) name.
        settings: Its settings dataclass.
        roles: Model roles and their defaults (a spec string, ``REQUIRED`` or ``OPTIONAL``).
        output: File (``.jsonl``) or folder name of its output in the pipeline's output directory.
        input_from: The stage whose output it reads (None: it reads nothing, or a configured ``input``).
        uses_prompts: Whether its requests use the prompt templates (they are then part of its fingerprint).
        training: Trainer kind of a training stage (``"sft"``, ``"dpo"``), else None.
    """

    name: str
    settings: type
    roles: dict[str, str]
    output: str
    input_from: str | None
    uses_prompts: bool = False
    training: str | None = None


STAGES: tuple[StageDef, ...] = (
    StageDef("qft-data", QftDataSettings, {"model": REQUIRED}, "qft-data.jsonl", None),
    StageDef("qft", TrainingSettings, {"model": REQUIRED}, "qft", "qft-data", training="sft"),
    StageDef("qpo-pairs", QpoPairsSettings, {"model": "stage:qft", "rewriter": REQUIRED}, "qpo-pairs.jsonl", None,
             uses_prompts=True),
    StageDef("qpo", TrainingSettings, {"model": "stage:qft"}, "qpo", "qpo-pairs", training="dpo"),
    StageDef("generate", GenerateSettings, {"model": "stage:qpo"}, "generate.jsonl", None),
    StageDef("filter-language", LanguageSettings, {}, "filter-language.jsonl", "generate"),
    StageDef("filter-solvable", SolvableSettings, {"judge": REQUIRED}, "filter-solvable.jsonl", "filter-language",
             uses_prompts=True),
    StageDef("difficulty", DifficultySettings, {"solver": OPTIONAL, "scorer_model": REQUIRED}, "difficulty.jsonl",
             "filter-solvable", uses_prompts=True),
    StageDef("respond", RespondSettings, {"model": REQUIRED}, "respond.jsonl", "difficulty", uses_prompts=True),
    StageDef("reward-select", RewardSettings, {"reward_model": REQUIRED}, "reward-select.jsonl", "respond"),
    StageDef("decontaminate", DecontaminateSettings, {}, "decontaminate.jsonl", "reward-select"),
)  # fmt: skip
STAGE_DEFS = {stage.name: stage for stage in STAGES}
STAGE_ORDER = tuple(STAGE_DEFS)


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


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; learning rates are written that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml(text: str) -> Any:
    """Parses YAML with the config's number rules (``1e-5`` is a float)."""
    return yaml.load(text, Loader=_Loader)


def load_pipeline_config(path: str | os.PathLike) -> PipelineConfig:
    """Reads and checks a pipeline config file.

    Raises:
        FileNotFoundError: The file does not exist.
        ConfigError: Anything wrong in it (the message starts with the key path).
    """
    path = Path(path)
    data = read_yaml(path.read_text(encoding="utf-8"))
    return parse_pipeline_config(data if data is not None else {}, path)


def parse_pipeline_config(data: Any, path: str | os.PathLike = "pipeline.yaml") -> PipelineConfig:
    """Checks config data already read from YAML (``path`` locates relative paths).

    Raises:
        ConfigError: Anything wrong in it.
    """
    path = Path(path)
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    check_keys(data, TOP_KEYS, "")
    models = _named_models(data.get("models"))
    prompts = build_settings(Prompts, data.get("prompts"), "prompts")
    sections = data.get("stages") or {}
    if not isinstance(sections, Mapping):
        raise ConfigError(f"stages: expected a mapping, got {type(sections).__name__}")
    check_keys(sections, list(STAGE_ORDER), "stages")
    base = path.parent
    stages = {stage.name: _stage(stage, sections.get(stage.name) or {}, models, sections, base) for stage in STAGES}
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


def _stage(
    stage: StageDef, section: Any, models: dict[str, ModelSpec], sections: Mapping[str, Any], base: Path
) -> StageConfig:
    path = f"stages.{stage.name}"
    if not isinstance(section, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {type(section).__name__}")
    known = [f.name for f in dataclasses.fields(stage.settings)] + [*stage.roles, "input"]
    check_keys(section, known, path)
    roles = {role: section[role] for role in stage.roles if role in section}
    settings_data = {k: v for k, v in section.items() if k not in stage.roles and k != "input"}
    settings = build_settings(stage.settings, settings_data, path)
    _check_trainer_arguments(stage, settings, path)
    specs = {role: _role(stage, role, roles, models, sections, path) for role in stage.roles}
    input_path = _input(stage, section.get("input"), base, path)
    if isinstance(settings, DecontaminateSettings):
        settings = _decontaminate_paths(settings, base, path)
    return StageConfig(settings, specs, input_path)


def _check_trainer_arguments(stage: StageDef, settings: Any, path: str) -> None:
    """Trainer arguments are checked now, not when the stage starts hours into a run."""
    from .training import check_overrides

    if stage.training:
        check_overrides(stage.training, settings.training, f"{path}.training")
    if isinstance(settings, DifficultySettings):
        check_overrides("regression", settings.scorer.training, f"{path}.scorer.training")


def _role(
    stage: StageDef,
    role: str,
    given: Mapping[str, Any],
    models: dict[str, ModelSpec],
    sections: Mapping[str, Any],
    path: str,
) -> ModelSpec | None:
    value = given.get(role)
    if value is None and stage.name == "qft-data":
        value = (sections.get("qft") or {}).get("model")  # the tokenizer of the model QFT trains
    if value is None:
        default = stage.roles[role]
        if default == REQUIRED:
            raise ConfigError(f"{join(path, role)}: required (a model name from 'models' or a model spec)")
        if default == OPTIONAL:
            return None
        value = default
    if isinstance(value, str) and value in models:
        return models[value]
    return ModelSpec.parse(value, join(path, role))


def _input(stage: StageDef, value: Any, base: Path, path: str) -> Path | None:
    if value is None:
        if stage.name == "qft-data":
            raise ConfigError(f"{path}.input: required (the seed problem set)")
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{path}.input: expected a path string, got {type(value).__name__}")
    return resolve_path(value, base)


def _decontaminate_paths(settings: DecontaminateSettings, base: Path, path: str) -> DecontaminateSettings:
    if not settings.eval_sets:
        raise ConfigError(f"{path}.eval_sets: at least one evaluation set is required")
    eval_sets = [dataclasses.replace(s, path=str(resolve_path(s.path, base))) for s in settings.eval_sets]
    return dataclasses.replace(settings, eval_sets=eval_sets)


def resolve_path(value: str, base: Path) -> Path:
    """``value`` against the config's folder if it exists there, else against the working directory."""
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        return candidate
    return base / candidate if (base / candidate).exists() or not candidate.exists() else candidate.resolve()
