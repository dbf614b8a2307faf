"""The options of an evaluation, declared once: the ``evaluate`` YAML, the command line and the Python API read them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..configuration import ConfigError, build, join, load_yaml, resolve_local
from ..models import ModelConfig


@dataclass
class EvalSetConfig:
    """One evaluation set and how it is scored.

    Attributes:
        name: The set's name in tables.
        path: A JSONL / JSON / Parquet file of rows (see :mod:`swift_callbacks.evaluation.examples` for fields).
        metric: ``exact_match`` (final answer of a greedy generation), ``choice`` (the option with the highest
            log-likelihood) or ``judge`` (a generation judged against the golden answer by an LLM).
        last_number: exact_match only: a reply without an answer marker answers with its last number.
        case_sensitive: exact_match only: the case of text answers counts (a task whose answer is the case).
        scoring: choice only: ``letter`` (the options are listed, the letter's log-likelihood decides, as MMLU) or
            ``text`` (each option's own text as the completion, scored by its log-likelihood: the quantity the
            training loss and the swift study's influence are defined on).
        max_new_tokens: Generation length cap (exact_match, judge).
        limit: Evaluate only the first ``limit`` rows.
    """

    name: str
    path: str
    metric: str = "exact_match"
    last_number: bool = False
    case_sensitive: bool = False
    scoring: str = "letter"
    max_new_tokens: int = 64
    limit: int | None = None

    def check(self, path: str) -> None:
        from .metrics import METRIC_CLASSES  # the registry imports this module

        if self.metric not in METRIC_CLASSES:
            known = ", ".join(sorted(METRIC_CLASSES))
            raise ConfigError(f"{join(path, 'metric')}: must be one of {known}, got {self.metric!r}")
        if self.scoring not in ("letter", "text"):
            raise ConfigError(f"{join(path, 'scoring')}: must be 'letter' or 'text', got {self.scoring!r}")
        for option, metric in (("last_number", "exact_match"), ("case_sensitive", "exact_match"),
                               ("scoring", "choice")):  # fmt: skip
            if getattr(self, option) != getattr(EvalSetConfig, option) and self.metric != metric:
                raise ConfigError(f"{join(path, option)}: applies to metric {metric} only (this set: {self.metric})")
        if self.max_new_tokens < 1:
            raise ConfigError(f"{join(path, 'max_new_tokens')}: must be >= 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"{join(path, 'limit')}: must be >= 1, got {self.limit}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"{join(path, 'name')}: a set name must be non-empty, without '/', got {self.name!r}")


@dataclass
class JudgeConfig:
    """The LLM that judges generations against golden answers (metric ``judge``).

    Attributes:
        base_url: An OpenAI-compatible server (``http://127.0.0.1:8000/v1``).
        model: The model name on that server, or a registered backend's model.
        backend: ``openai`` (with ``base_url``), ``transformers`` (``model`` is a local folder or model spec), or
            a backend registered with :func:`swift_callbacks.generation.register_backend`.
        api_key_env: Environment variable holding the API key (default: SWIFT_API_KEY, then OPENAI_API_KEY).
        max_tokens: Length cap of the judge's reply.
        max_retries: HTTP retries per request.
        timeout: Seconds per HTTP attempt.
    """

    model: str
    base_url: str | None = None
    backend: str = "openai"
    api_key_env: str | None = None
    max_tokens: int = 512
    max_retries: int = 5
    timeout: float = 60.0

    def check(self, path: str) -> None:
        if self.backend == "openai" and not self.base_url:
            raise ConfigError(f"{join(path, 'base_url')}: the openai judge backend needs the server URL")
        if not self.model:
            raise ConfigError(f"{join(path, 'model')}: must not be empty")


@dataclass
class EvaluateConfig:
    """What to evaluate, on what, and where results go.

    Attributes:
        models: Model specs (Hub id, folder, ``.gguf``, ``smollm2``, ``tiny:``), checkpoint folders, or training
            run folders (every ``checkpoint-*`` in step order, then the final model when the folder holds one).
        sets: The evaluation sets.
        output_dir: Where per-example records (the cache: a rerun only evaluates what is missing) and
            ``results.csv`` go.
        final_only: Of a run folder, evaluate only the final model (not every ``checkpoint-*``).
        base_model: The model LoRA checkpoints were trained from (default: the run's recipe, else the adapter's
            own ``base_model_name_or_path``).
        batch_size: Prompts per forward / generate call.
        bootstrap: Bootstrap resamples for the confidence intervals.
        confidence: Level of the intervals.
        seed: Seed of the bootstrap.
        judge: The judge, needed when a set's metric is ``judge``.
        progress: Show progress bars.
    """

    models: list[str] = field(default_factory=list)
    sets: list[EvalSetConfig] = field(default_factory=list)
    output_dir: str = ""
    base_model: ModelConfig | None = None
    final_only: bool = False
    batch_size: int = 8
    bootstrap: int = 2000
    confidence: float = 0.95
    seed: int = 0
    judge: JudgeConfig | None = None
    progress: bool = True

    def check_complete(self, path: str = "") -> None:
        """:meth:`check`, and that models and the output folder are given (a validation study fills them in)."""
        if not self.models:
            raise ConfigError(f"{join(path, 'models')}: give at least one model, checkpoint or run folder")
        if not self.output_dir:
            raise ConfigError(f"{join(path, 'output_dir')}: give the folder for records and results")
        self.check(path)

    def check(self, path: str = "") -> None:
        if not self.sets:
            raise ConfigError(f"{join(path, 'sets')}: give at least one evaluation set")
        names = [s.name for s in self.sets]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ConfigError(f"{join(path, 'sets')}: set names must be unique, {dups} repeat")
        for i, s in enumerate(self.sets):
            s.check(join(join(path, "sets"), i))
        if self.batch_size < 1:
            raise ConfigError(f"{join(path, 'batch_size')}: must be >= 1, got {self.batch_size}")
        if self.bootstrap < 100:
            raise ConfigError(f"{join(path, 'bootstrap')}: use at least 100 resamples, got {self.bootstrap}")
        if not 0.5 <= self.confidence < 1:
            raise ConfigError(f"{join(path, 'confidence')}: must be in [0.5, 1), got {self.confidence}")
        if any(s.metric == "judge" for s in self.sets) and self.judge is None:
            judged = [s.name for s in self.sets if s.metric == "judge"]
            raise ConfigError(f"{join(path, 'judge')}: sets {judged} are judged by an LLM; configure the judge")
        if self.judge is not None:
            self.judge.check(join(path, "judge"))
        if self.base_model is not None:
            self.base_model.check(join(path, "base_model"))


def evaluate_config(data: Any, path: str = "", base_dir: str | os.PathLike | None = None) -> EvaluateConfig:
    """An :class:`EvaluateConfig` from plain data (a YAML mapping), checked, with local paths resolved."""
    config = build(EvaluateConfig, data, path)
    if base_dir is not None:
        for i, s in enumerate(config.sets):
            if not s.path.startswith("demo:"):
                s.path = str(resolve_local(s.path, base_dir, join(join(join(path, "sets"), i), "path")))
    config.check_complete(path)
    return config


def load_evaluate_config(file: str | os.PathLike, overrides: Sequence[str] = ()) -> EvaluateConfig:
    """The ``evaluate`` YAML at ``file`` with ``--set`` overrides applied; set paths are relative to the file."""
    return evaluate_config(load_yaml(file, overrides), base_dir=Path(file).resolve().parent)
