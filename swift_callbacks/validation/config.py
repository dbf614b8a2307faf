"""The validation study's options, declared once (``swift-study validate --config``).

A validation config names a training recipe (the Base run: model, training arguments, LoRA, the Base data and
the influence section of the swift study), the strategies' data, the variants to train, the seeds, and the
evaluation (an ``evaluate`` section whose models and output folder the study fills in)::

    output_dir: out/validate
    recipe: recipes/cot/validate_base.yaml     # or the recipe inline, as a mapping
    strategies:
      cot: {data: [data/cot.jsonl], study: cot}
    variants: [base, base+cot, base->cot]     # default: base, base+X and base->X for every strategy
    seeds: [0, 1]
    evaluation:
      sets: [{name: gsm8k, path: data/gsm8k_test.jsonl}]
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..configuration import ConfigError, build, join, load_yaml, suggest
from ..evaluation.config import EvaluateConfig
from ..training.config import MixtureSource, config_from_dict, load_config

BASE = "base"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass
class StrategyConfig:
    """One data strategy under validation.

    Attributes:
        data: Its training data (sources as in a recipe's ``data.train``: paths, ``demo:<name>``, Hub ids).
        study: The study (``influence.studies[].type`` of the recipe) whose verdicts are this strategy's swift
            prediction; default: the strategy's name when the recipe has such a study, else none.
    """

    data: list[MixtureSource | str]
    study: str | None = None

    def check(self, path: str) -> None:
        if not self.data:
            raise ConfigError(f"{join(path, 'data')}: needs at least one source")
        self.data = [MixtureSource(path=s) if isinstance(s, str) else s for s in self.data]
        for i, source in enumerate(self.data):
            source.check(join(join(path, "data"), i))


@dataclass(frozen=True)
class Variant:
    """A training variant: ``base``, ``base+X`` (random mixture), ``base->X`` (base, then X, within each epoch),
    and combinations (``base+X+Y``, ``base->X+Y``: X and Y mixed, after base)."""

    name: str
    mixed: tuple[str, ...] = ()
    after: tuple[str, ...] = ()

    @property
    def slug(self) -> str:
        """A folder name: ``base_then_cot``, ``base_plus_cot_plus_eval``."""
        return self.name.replace("->", "_then_").replace("+", "_plus_")

    @property
    def strategies(self) -> tuple[str, ...]:
        return self.mixed or self.after


def parse_variant(text: str, strategies: Sequence[str], path: str) -> Variant:
    """``base``, ``base+X[+Y...]`` or ``base->X[+Y...]`` with X, Y strategy names.

    Raises:
        ConfigError: Another form, or a name that is not a strategy (with a suggestion).
    """
    compact = text.replace(" ", "")
    head, arrow, tail = compact.partition("->")
    parts = tail.split("+") if arrow else head.split("+")[1:]
    if (arrow and head != BASE) or (not arrow and head.split("+")[0] != BASE) or (arrow and not tail):
        raise ConfigError(f"{path}: {text!r} is not base, base+X or base->X (X: {', '.join(strategies)})")
    for name in parts:
        if name not in strategies:
            raise ConfigError(f"{path}: {name!r} in {text!r} is not a strategy; {suggest(name, list(strategies))}")
    if len(set(parts)) != len(parts):
        raise ConfigError(f"{path}: {text!r} names a strategy twice")
    return Variant(compact, () if arrow else tuple(parts), tuple(parts) if arrow else ())


@dataclass
class ValidationConfig:
    """The whole validation study.

    Attributes:
        output_dir: Where the runs (``runs/<variant>-seed<s>``), the evaluation and the tables go.
        recipe: The Base run's training recipe: a file, or the recipe as a mapping. Its ``training.output_dir``
            is replaced per run; its ``influence`` section is used by the first seed's Base run only.
        strategies: ``{name: strategy}`` (lower-case names).
        variants: Which to train (default: ``base``, then ``base+X`` and ``base->X`` for every strategy).
        seeds: Training seeds (``training.seed`` and the data seed); every variant is trained once per seed.
        evaluation: The ``evaluate`` options (sets, batch size, intervals, judge); models and output folder are
            filled in.
    """

    output_dir: str
    recipe: str | dict[str, Any]
    strategies: dict[str, StrategyConfig]
    evaluation: EvaluateConfig
    variants: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    base_dir: Path = field(default_factory=Path.cwd, metadata={"config": False})

    def parsed_variants(self) -> list[Variant]:
        names = self.variants or [BASE, *(f"{BASE}+{s}" for s in self.strategies),
                                   *(f"{BASE}->{s}" for s in self.strategies)]  # fmt: skip
        variants = [parse_variant(v, list(self.strategies), join("variants", i)) for i, v in enumerate(names)]
        if BASE not in [v.name for v in variants]:
            variants.insert(0, Variant(BASE))
        return variants

    def recipe_data(self) -> dict[str, Any]:
        """The Base recipe as plain data (a deep copy)."""
        if isinstance(self.recipe, dict):
            return copy.deepcopy(self.recipe)
        return load_yaml(self.recipe)

    def check_study(self) -> None:
        """Checks what needs the resolved paths (``build`` checks each field's own values before)."""
        if not self.strategies:
            raise ConfigError("strategies: name at least one strategy and its data")
        for name, strategy in self.strategies.items():
            if not _NAME.match(name) or name == BASE:
                raise ConfigError(f"strategies.{name}: a strategy name is lower-case letters, digits and '_', not base")
            strategy.check(join("strategies", name))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: give distinct seeds, got {self.seeds}")
        for i, seed in enumerate(self.seeds):
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
                raise ConfigError(f"seeds[{i}]: a seed is a whole number from 0 to 2**32 - 1, got {seed!r}")
        if self.evaluation.models or self.evaluation.output_dir:
            raise ConfigError("evaluation: models and output_dir are filled in by the study; remove them")
        variants = self.parsed_variants()
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ConfigError(f"variants: {names} repeat a variant")
        recipe = self.recipe_check()
        studies = {s.type for s in recipe.influence.studies} if recipe.influence else set()
        for name, strategy in self.strategies.items():
            if strategy.study is not None and strategy.study not in studies:
                raise ConfigError(f"strategies.{name}.study: the recipe has no study {strategy.study!r} "
                                  f"(its studies: {sorted(studies) or 'none'})")  # fmt: skip
            if strategy.study is None and name in studies:
                strategy.study = name
        self.evaluation.check("evaluation")

    def recipe_check(self):
        """The Base recipe as a checked ``TrainConfig`` (paths resolved against the recipe's own folder)."""
        if isinstance(self.recipe, dict):
            data = copy.deepcopy(self.recipe)
            data.setdefault("training", {}).setdefault("output_dir", str(Path(self.output_dir) / "runs" / BASE))
            return config_from_dict(data, base_dir=self.base_dir)
        return load_config(self.recipe)


def load_validation_config(file: str | os.PathLike, overrides: Sequence[str] = ()) -> ValidationConfig:
    """The validation YAML at ``file`` with ``--set`` overrides; relative paths are relative to the file."""
    base_dir = Path(file).resolve().parent
    return validation_config(load_yaml(file, overrides), base_dir)


def validation_config(data: Any, base_dir: str | os.PathLike | None = None) -> ValidationConfig:
    """A checked :class:`ValidationConfig` from plain data."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if isinstance(data, dict) and isinstance(data.get("evaluation"), dict):
        evaluation = data["evaluation"]
        for i, s in enumerate(evaluation.get("sets") or []):
            if isinstance(s, dict) and isinstance(s.get("path"), str) and not s["path"].startswith("demo:"):
                s["path"] = str(_resolve(s["path"], base, f"evaluation.sets[{i}].path"))
    config = build(ValidationConfig, data, "")
    config.base_dir = base
    if isinstance(config.recipe, str):
        config.recipe = str(_resolve(config.recipe, base, "recipe"))
    for strategy in config.strategies.values():
        for i, source in enumerate(strategy.data):
            if isinstance(source, str):
                source = strategy.data[i] = MixtureSource(path=source)
            local = base / source.path
            if not source.path.startswith("demo:") and local.exists():
                source.path = str(local.resolve())
    config.check_study()
    return config


def _resolve(value: str, base: Path, where: str) -> Path:
    from ..configuration import resolve_local

    return resolve_local(value, base, where)
