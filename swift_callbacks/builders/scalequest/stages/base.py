"""What a ScaleQuest stage is: one class that says everything the config, the runner and the CLI need to know.

A stage class declares, in one place, its name, settings dataclass, model roles (with their defaults), the stage
whose output it reads, its output name, whether its requests use the prompt templates, its trainer kind, its help
text and its :meth:`Stage.run`. The few things that differ between stages (extra paths in the settings, a role
default taken from another stage, extra command-line options) are hooks on the class, never name checks elsewhere.

Adding a stage: write a module in this folder with a :class:`Stage` subclass and list it in ``stages/__init__.py``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ....configuration import ConfigError, resolve_local
from ..backends import generation_backend
from ..contract import StageError, StageResult, StageStats, finish, read_rows
from ..contract import fingerprint as make_fingerprint
from ..models import ModelSpec
from ..prompts import Prompts
from ..training import check_overrides, train_dpo, train_sft

REQUIRED = "<required>"
OPTIONAL = "<optional>"


@dataclass(frozen=True)
class TrainingSettings:
    """Settings of a training stage.

    Attributes:
        training: Trainer-argument overrides (``trl.SFTConfig`` for ``qft``, ``trl.DPOConfig`` for ``qpo``).
    """

    training: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageRun:
    """Everything one stage run needs, resolved.

    Attributes:
        stage: The stage.
        settings: Its settings.
        models: Its model roles (``stage:`` models already resolved; None for an optional role not given).
        input: Input file or folder, or None.
        output: Output file or folder.
        cache_dir: The generation cache directory.
        prompts: The prompt templates.
        fingerprint: The run's fingerprint.
    """

    stage: Stage
    settings: Any
    models: dict[str, ModelSpec | None]
    input: Path | None
    output: Path
    cache_dir: Path | None
    prompts: Prompts
    fingerprint: str = ""

    @property
    def name(self) -> str:
        return self.stage.name

    def model(self, role: str) -> ModelSpec:
        spec = self.models.get(role)
        if spec is None:
            raise StageError(f"{self.name}: no model given for role {role!r}")
        return spec

    def generator(self, stack: ExitStack, role: str) -> Any:
        """A cached :class:`~swift_callbacks.generation.Generator` over the model of ``role``, closed with ``stack``."""
        from ....generation.runner import Generator

        backend = generation_backend(self.model(role))
        return stack.enter_context(Generator(backend, self.cache_dir, desc=f"{self.name}:{role}"))


class Stage:
    """A pipeline stage (subclass it; the class attributes are the stage's declaration).

    Attributes:
        name: Stage and command name.
        settings: Its settings dataclass (defaults: the paper's settings).
        roles: Model roles and their defaults (a spec string such as ``"stage:qft"``, ``REQUIRED`` or
            ``OPTIONAL``).
        input_from: The stage whose output it reads (None: it reads nothing, or a configured ``input``).
        input_required: Whether a configured ``input`` is required (a stage that starts from outside data).
        output: File (``.jsonl``) or folder name of its output (default ``<name>.jsonl``).
        uses_prompts: Whether its requests use the prompt templates (they are then part of its fingerprint).
        trainer: Trainer kind of a training stage (``"sft"``, ``"dpo"``), else None.
        help: One line for ``--help``.
        main_role: The role the CLI's backend options (``--base-url``, ``--local-model``, ``--spec``...) choose.
        role_flags: CLI option of each other role (``{"scorer_model": "--scorer-model"}``).
        sampling_field: The settings field that ``--temperature``/``--top-p``/``--max-tokens`` set.
        headline_metric: The metric the pipeline's summary table shows.
    """

    name: ClassVar[str]
    settings: ClassVar[type]
    roles: ClassVar[dict[str, str]] = {}
    input_from: ClassVar[str | None] = None
    input_required: ClassVar[bool] = False
    output: ClassVar[str] = ""
    uses_prompts: ClassVar[bool] = False
    trainer: ClassVar[str | None] = None
    help: ClassVar[str] = ""
    main_role: ClassVar[str | None] = None
    role_flags: ClassVar[dict[str, str]] = {}
    sampling_field: ClassVar[str | None] = None
    headline_metric: ClassVar[str | None] = None

    @property
    def output_name(self) -> str:
        return self.output or f"{self.name}.jsonl"

    @property
    def reads_input(self) -> bool:
        """Whether the stage reads an input file (the stages that sample from a model read none)."""
        return self.input_required or self.input_from is not None

    # ------------------------------------------------------------------------------------------- config hooks

    def default_role(self, role: str, sections: Mapping[str, Any]) -> Any:
        """The value of ``role`` when the stage's section does not give it (``sections``: every stage's section)."""
        return self.roles[role]

    def check(self, settings: Any, path: str) -> None:
        """Checks at load time what the settings type cannot express (trainer arguments, by default).

        Raises:
            ConfigError: A problem, named by its key path.
        """
        if self.trainer:
            check_overrides(self.trainer, settings.training, f"{path}.training")

    def resolve_paths(self, settings: Any, base: Path, path: str) -> Any:
        """The settings with the local paths they name resolved against the config's folder ``base`` (the runner
        checks that they exist before any stage runs).

        Raises:
            ConfigError: A problem with the paths, named by its key path.
        """
        return settings

    # ---------------------------------------------------------------------------------------------- CLI hooks

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        """Adds the stage's own command-line options to its ``settings`` group."""

    def apply_arguments(self, args: argparse.Namespace, data: dict[str, Any]) -> None:
        """Puts the stage's own command-line options into its settings ``data`` (a plain mapping)."""

    # ------------------------------------------------------------------------------------------------ running

    def run(self, run: StageRun, stack: ExitStack) -> StageResult:
        """Runs the stage; models and generators it opens are closed with ``stack``."""
        raise NotImplementedError

    def headline(self, stats: StageStats) -> str:
        """The summary table's headline of this stage's stats."""
        if self.headline_metric is None:
            return ""
        value = stats.metrics.get(self.headline_metric)
        return f"{self.headline_metric} {value:.4g}" if isinstance(value, (int, float)) else (
            f"{self.headline_metric} {value}")  # fmt: skip


class TrainingStage(Stage):
    """A stage that fine-tunes a model on its input rows and writes the model folder."""

    settings = TrainingSettings
    headline_metric = "train_loss"
    role_flags: ClassVar[dict[str, str]] = {"model": "--base"}
    required_columns: ClassVar[tuple[str, ...]] = ()

    @property
    def output_name(self) -> str:
        return self.output or self.name

    def run(self, run: StageRun, stack: ExitStack) -> StageResult:
        return train_stage(self.name, self.trainer or "", run.input, run.output, model=run.model("model"),
                           training=run.settings.training, required=self.required_columns,
                           fingerprint=run.fingerprint)  # fmt: skip


def train_stage(
    stage: str,
    kind: str,
    input: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model: ModelSpec | str,
    training: Mapping[str, Any] | None = None,
    required: tuple[str, ...],
    fingerprint: str | None = None,
) -> StageResult:
    """Runs one training stage (``qft`` or ``qpo``) under the stage contract.

    The model folder is the output; ``<output_dir>.stats.json`` gets the training metrics and
    ``<output_dir>.rejects.jsonl`` the input rows that could not be used.

    Raises:
        StageError: No usable training rows.
    """
    started = time.perf_counter()
    spec = ModelSpec.parse(model, f"{stage}.model")
    overrides = dict(training or {})
    check_overrides(kind, overrides, f"{stage}.training")
    rows, rejects, rows_in = read_rows(input, list(required))
    if not rows:
        raise StageError(f"{stage}: no usable training rows in {str(input)!r}")
    fingerprint = fingerprint or make_fingerprint(stage, overrides, [input], [spec.identity()])
    train = train_sft if kind == "sft" else train_dpo
    metrics = train(rows, spec, output_dir, overrides, run_key=fingerprint)
    stats = StageStats(stage=stage, unit="examples", rows_in=rows_in, rows_out=len(rows), metrics=metrics,
                       settings={"model": spec.identity(), "training": overrides}, fingerprint=fingerprint)  # fmt: skip
    if not metrics.get("is_main_process", True):  # other ranks of a distributed run write nothing
        return StageResult(rows, rejects, stats)
    return finish(output_dir, None, rejects, stats, started=started)


def resolve_input(value: Any, base: Path, path: str) -> Path:
    """A configured ``input`` as an absolute path (its existence is checked when the run starts: it may be the
    output of an earlier stage of the same run).

    Raises:
        ConfigError: Not a path string.
    """
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{path}.input: expected a path string, got {type(value).__name__}")
    return resolve_local(os.fspath(value), base, f"{path}.input", must_exist=False)
