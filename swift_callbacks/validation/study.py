"""The validation study as steps: train every variant and seed, evaluate the final models, write Table 2 and
the agreement of the swift verdicts with the measured accuracy changes.

Each step can be rerun: a finished run (its ``validation_run.json`` marker) is not trained again, an interrupted
one resumes from its last checkpoint, and the evaluation reuses its per-example records. Every run folder records
the fingerprint of the recipe it was trained with (``validation_recipe.json``, written before training starts): a
rerun whose config gives that run another recipe or data stops, naming the folder, before anything is trained,
instead of reusing or resuming a run of other settings.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..configuration import ConfigError
from ..evaluation import EvalResults, evaluate
from ..evaluation.records import file_digest, fingerprint
from ..files import write_atomic
from ..training.config import config_from_dict, is_demo
from ..training.data import build_mixture, load_source
from ..training.train import run_training
from .config import BASE, ValidationConfig, Variant
from .tables import agreement_table, table2

logger = logging.getLogger(__name__)
DONE_MARKER = "validation_run.json"
RECIPE_MARKER = "validation_recipe.json"
SEQUENCE_FILE = "variant_train.jsonl"


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study: a variant with a seed, in ``folder``; ``influence`` for the swift study."""

    variant: Variant
    seed: int
    folder: Path
    influence: bool

    @property
    def label(self) -> str:
        return f"{self.folder.name}/final"


def plan(config: ValidationConfig) -> list[RunSpec]:
    """Every run, Base first; the first seed's Base run carries the recipe's influence section."""
    runs = Path(config.output_dir) / "runs"
    return [
        RunSpec(v, seed, runs / f"{v.slug}-seed{seed}", v.name == BASE and seed == config.seeds[0])
        for v in config.parsed_variants()
        for seed in config.seeds
    ]


def run_recipe(config: ValidationConfig, run: RunSpec) -> dict[str, Any]:
    """The training recipe of one run (as plain data, the way ``swift-study train --config`` reads it)."""
    recipe = config.recipe_data()
    training = dict(recipe.get("training") or {})
    training.update(output_dir=str(run.folder), seed=run.seed)
    data = dict(recipe.get("data") or {})
    data["seed"] = run.seed
    base_sources = list(data.get("train") or [])
    if run.variant.mixed:
        data["train"] = base_sources + [_plain(s) for name in run.variant.mixed for s in config.strategies[name].data]
        data["shuffle"] = True
    elif run.variant.after:
        data["train"] = [str(_write_sequence(config, run, base_sources, training))]
        data["shuffle"] = False
        training.update(num_train_epochs=1, train_sampling_strategy="sequential")
    if not run.influence:
        recipe.pop("influence", None)
    _check_training(run, training)
    recipe.update(training=training, data=data)
    return recipe


def _check_training(run: RunSpec, training: dict) -> None:
    if training.get("save_strategy") == "no" and run.influence:
        raise ConfigError("recipe.training.save_strategy: the Base run computes influence at saves; do not set 'no'")
    if not run.variant.after:
        return
    if int(training.get("max_steps", -1) or -1) > 0:
        raise ConfigError("recipe.training.max_steps: base->X orders the data within epochs and max_steps would cut "
                          "it short; give num_train_epochs instead")  # fmt: skip
    epochs = training.get("num_train_epochs", 3)
    if float(epochs) != int(epochs) or int(epochs) < 1:
        raise ConfigError(f"recipe.training.num_train_epochs: base->X orders data within whole epochs, got {epochs}")


def check_runs(config: ValidationConfig, runs: list[RunSpec]) -> None:
    """Checks the recipe of every run before anything is trained (what would otherwise stop the study after hours
    of training: a strategy file that is missing, ``max_steps`` with base->X, ...).

    Raises:
        ConfigError: The first problem, naming the variant.
    """
    checked: set[str] = set()
    for run in runs:
        recipe = config.recipe_data()
        training = {**(recipe.get("training") or {}), "output_dir": str(run.folder), "seed": run.seed}
        data = dict(recipe.get("data") or {})
        strategies = [_plain(s) for name in run.variant.strategies for s in config.strategies[name].data]
        data["train"] = list(data.get("train") or []) + strategies
        if not run.influence:
            recipe.pop("influence", None)
        recipe.update(training=training, data=data)
        try:
            _check_training(run, training)
            built = config_from_dict(recipe, base_dir=_recipe_dir(config))
            for source in built.data.train:  # readable, with rows: found now, not after hours of training
                if source.path not in checked and (is_demo(source.path) or Path(source.path).exists()):
                    _quietly(load_source, source)
                    checked.add(source.path)
        except ConfigError as err:
            raise ConfigError(f"variant {run.variant.name} (seed {run.seed}): {err}") from None


def _quietly(function: Any, *args: Any) -> Any:
    """``function(*args)`` without datasets' progress bars (a check prints one line, or nothing)."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        return function(*args)
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def recipe_fingerprint(run: RunSpec, recipe: dict[str, Any], base_dir: Path, digests: dict | None = None) -> str:
    """What decides a run's training: its recipe (wherever its folder lies) with the content of every local file it
    names (data, study sets, base->X's ordered data), so a file changed under the same path is a new recipe."""
    data = copy.deepcopy(recipe)
    data["training"].pop("output_dir", None)
    data["training"].pop("resume_from_checkpoint", None)
    return fingerprint(_with_file_digests(data, base_dir, {} if digests is None else digests))


def _with_file_digests(value: Any, base_dir: Path, digests: dict[Path, str]) -> Any:
    """``value`` with every string that names a local file (absolute, or relative to ``base_dir``) tagged with the
    file's digest (``digests``: those already read in this check, as every run names the same data files).
    Folders (a local model, a saved dataset) are named by path only."""
    if isinstance(value, dict):
        return {k: _with_file_digests(v, base_dir, digests) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_with_file_digests(v, base_dir, digests) for v in value]
    if isinstance(value, str) and value and len(value) < 4096:
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if path.is_file():
            if path not in digests:
                digests[path] = file_digest(path)
            return f"{value}#sha256:{digests[path]}"
    return value


def _check_same_recipe(run: RunSpec, recipe_id: str) -> None:
    """A run folder trained (or started) with another recipe is refused, never reused or resumed."""
    for name in (DONE_MARKER, RECIPE_MARKER):
        marker = run.folder / name
        if not marker.is_file():
            continue
        try:
            recorded = json.loads(marker.read_text(encoding="utf-8")).get("recipe")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            recorded = None
        if recorded != recipe_id:
            raise ConfigError(f"{run.folder}: trained with another recipe or data than the config now gives "
                              f"({run.variant.name}, seed {run.seed}); delete the folder to train it again, or give "
                              "another output_dir")  # fmt: skip
        return
    if any(run.folder.glob("checkpoint-*")):
        raise ConfigError(f"{run.folder}: holds checkpoints of an unknown recipe; delete it or give another output_dir")


def _plain(source: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    return asdict(source) if is_dataclass(source) else source


def _write_sequence(config: ValidationConfig, run: RunSpec, base_sources: list, training: dict) -> Path:
    """``base->X``: per epoch, the Base data shuffled, then the strategies' data (mixed) shuffled; written once."""
    from datasets import concatenate_datasets

    _check_training(run, training)
    epochs = training.get("num_train_epochs", 3)
    # The Base sources are read as the recipe reads them (paths relative to its folder, demo: files, columns).
    shell = {"model": {"name_or_path": "tiny"}, "data": {"train": base_sources}, "training": {"output_dir": "x"}}
    base_cfg = config_from_dict(shell, base_dir=_recipe_dir(config))
    base = build_mixture(base_cfg.data.train, run.seed, shuffle=False)
    after = build_mixture([s for n in run.variant.after for s in config.strategies[n].data], run.seed, shuffle=False)
    if sorted(base.column_names) != sorted(after.column_names):
        raise ConfigError(f"strategies {list(run.variant.after)}: columns {after.column_names} differ from the Base "
                          f"data's {base.column_names}; select shared ones with 'columns:'")  # fmt: skip
    parts = []
    for epoch in range(int(epochs)):
        parts += [base.shuffle(seed=run.seed * 1000 + epoch), after.shuffle(seed=run.seed * 1000 + 500 + epoch)]
    path = run.folder.parent / f"{run.folder.name}.{SEQUENCE_FILE}"
    return write_atomic(path, lambda fh: concatenate_datasets(parts).to_json(fh, lines=True, force_ascii=False))


def _recipe_dir(config: ValidationConfig) -> Path:
    return config.base_dir if isinstance(config.recipe, dict) else Path(config.recipe).resolve().parent


def train_all(config: ValidationConfig, runs: list[RunSpec]) -> None:
    """Trains every run not finished yet (an interrupted one resumes from its last checkpoint).

    Raises:
        ConfigError: A run folder trained or started with another recipe (checked for every run first).
    """
    check_runs(config, runs)
    recipes = [run_recipe(config, run) for run in runs]
    digests: dict[Path, str] = {}  # each data file read once for all runs
    ids = [recipe_fingerprint(r, recipe, _recipe_dir(config), digests) for r, recipe in zip(runs, recipes, strict=True)]
    for run, recipe_id in zip(runs, ids, strict=True):
        _check_same_recipe(run, recipe_id)
    for i, (run, recipe, recipe_id) in enumerate(zip(runs, recipes, ids, strict=True), start=1):
        if (run.folder / DONE_MARKER).is_file():
            logger.info("[%d/%d] %s: trained already", i, len(runs), run.folder.name)
            continue
        run.folder.mkdir(parents=True, exist_ok=True)
        (run.folder / RECIPE_MARKER).write_text(json.dumps({"recipe": recipe_id}), encoding="utf-8")
        if any(run.folder.glob("checkpoint-*")):
            recipe["training"]["resume_from_checkpoint"] = "last"
        print(f"[swift-study validate] [{i}/{len(runs)}] training {run.variant.name} (seed {run.seed})"
              + (" with the swift study" if run.influence else ""), flush=True)  # fmt: skip
        trainer = run_training(config_from_dict(recipe, base_dir=_recipe_dir(config)), influence=run.influence)
        del trainer
        gc.collect()
        info = {"variant": run.variant.name, "seed": run.seed, "influence": run.influence, "recipe": recipe_id}
        (run.folder / DONE_MARKER).write_text(json.dumps(info), encoding="utf-8")


def evaluate_all(config: ValidationConfig, runs: list[RunSpec]) -> EvalResults:
    """The final model of every run on the evaluation sets (records cached under ``output_dir/evaluation``)."""
    from dataclasses import replace

    evaluation = replace(config.evaluation, models=[str(r.folder) for r in runs], final_only=True,
                         output_dir=str(Path(config.output_dir) / "evaluation"))  # fmt: skip
    return evaluate(evaluation)


@dataclass
class ValidationResults:
    """Table 2 (accuracy per variant and set, change against Base with its interval) and the agreement table."""

    table2: pd.DataFrame
    agreement: pd.DataFrame
    evaluation: EvalResults
    output_dir: Path


def run_validation(config: ValidationConfig) -> ValidationResults:
    """All steps; writes ``table2.csv``/``.md`` and ``agreement.csv``/``.md`` into ``output_dir``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runs = plan(config)
    train_all(config, runs)
    results = evaluate_all(config, runs)
    out = Path(config.output_dir)
    t2 = table2(config, runs, results)
    base_run = next(r for r in runs if r.influence)
    agree = agreement_table(config, base_run.folder, t2)
    for name, frame in (("table2", t2), ("agreement", agree)):
        frame.to_csv(out / f"{name}.csv", index=False)
        (out / f"{name}.md").write_text(markdown_table(frame), encoding="utf-8")
    return ValidationResults(t2, agree, results, out)


def markdown_table(frame: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.3f}"
        return str(v)

    head = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    return head + "".join("| " + " | ".join(cell(v) for v in row) + " |\n" for row in frame.itertuples(index=False))
