"""Evaluation runs: which models (a model, a checkpoint, every checkpoint of a run), each set scored by its
metric, records cached per example, and the accuracy table with bootstrap intervals."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from ..configuration import ConfigError, build
from ..files import write_atomic
from ..generation import GenerationRequest, Generator, SamplingParams, make_backend
from ..generation.base import folder_digest
from ..models import ADAPTER_CONFIG, ModelConfig, load_checkpoint, load_model_and_tokenizer
from ..training.train import CONFIG_FILE
from .config import EvalSetConfig, EvaluateConfig, JudgeConfig
from .examples import ALL_TASKS, DEMO_PREFIX, EvalExample, read_examples, set_rows
from .metrics import JUDGE_FAILED, Judge, JudgeError, make_metric
from .records import ExampleRecord, RecordFile, file_digest, fingerprint
from .stats import Interval, paired_proportions, wilson_interval

logger = logging.getLogger(__name__)
RESULTS_FILE = "results.csv"
RECORDS_DIR = "records"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TABLE_COLUMNS = ["model", "run", "step", "set", "metric", "task", "n", "decided", "correct", "accuracy", "ci_low",
                 "ci_high", "no_answer", "truncated", "undecided"]  # fmt: skip


@dataclass(frozen=True)
class Target:
    """One model to evaluate.

    Attributes:
        label: Its name in tables (``run/checkpoint-40``, ``run/final``, or the model spec).
        source: A checkpoint folder or a model spec.
        run: The run folder's name, for checkpoints of a run.
        step: The checkpoint's training step (None for a final or plain model).
        base: The model a checkpoint folder was trained from (None for a model spec).
    """

    label: str
    source: str
    run: str | None = None
    step: int | None = None
    base: ModelConfig | None = None

    def identity(self) -> dict[str, Any]:
        """What the model's results depend on: a folder's content, or the spec (and the base of a checkpoint)."""
        if self.base is None:
            path = Path(self.source)
            return {"spec": self.source, "file": _file_identity(path) if path.is_file() else None}
        return {"folder": folder_digest(self.source), "base": self.base.name_or_path}

    def load(self) -> tuple[Any, Any]:
        """``(tokenizer, model)`` in eval mode."""
        if self.base is None:
            tokenizer, model = load_model_and_tokenizer(ModelConfig(self.source))
            return tokenizer, model.eval()
        return load_checkpoint(self.source, self.base)


def _file_identity(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def resolve_targets(models: list[str], base_model: ModelConfig | None = None, final_only: bool = False) -> list[Target]:
    """The models named by ``models``: specs as given, checkpoint folders, and every checkpoint of a run folder
    (only its final model with ``final_only``).

    Raises:
        ConfigError: A folder that holds no model, checkpoint or ``checkpoint-*`` folder; two targets with one label.
    """
    targets: list[Target] = []
    for spec in models:
        path = Path(spec).expanduser()
        if not path.is_dir():
            if path.suffix.lower() != ".gguf":
                ModelConfig(spec).check("models")
            targets.append(Target(spec, spec))
            continue
        checkpoints = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _CHECKPOINT.match(p.name)))
        if checkpoints and final_only and not _holds_weights(path):
            raise ConfigError(f"models: run {spec!r} has no final model (training did not finish?)")
        if final_only and _holds_weights(path):
            base = base_model or _run_base(path)
            targets.append(Target(f"{path.resolve().name}/final", str(path), path.resolve().name, None,
                                  base or _adapter_base(path)))  # fmt: skip
        elif checkpoints:
            empty = [p for _, p in checkpoints if not _holds_weights(p)]
            if empty:
                raise ConfigError(f"models: {str(empty[0])!r} holds no model weights (a save that was interrupted?); "
                                  "delete that folder, or name the run's other checkpoints one by one")  # fmt: skip
            base = base_model or _run_base(path)
            run = path.resolve().name
            targets += [
                Target(f"{run}/{p.name}", str(p), run, step, base or _adapter_base(p)) for step, p in checkpoints
            ]
            if _holds_weights(path):
                targets.append(Target(f"{run}/final", str(path), run, None, base or _adapter_base(path)))
        elif _holds_weights(path):
            match = _CHECKPOINT.match(path.name)
            step = int(match.group(1)) if match else None
            base = base_model or _run_base(path.parent) or _adapter_base(path)
            targets.append(Target(str(spec), str(path), None, step, base))
        else:
            raise ConfigError(f"models: {spec!r} is a folder with no model, checkpoint or checkpoint-* folders")
    labels = [t.label for t in targets]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ConfigError(f"models: {twice} would appear twice in the table; give each run folder its own name")
    return targets


def _holds_weights(folder: Path) -> bool:
    """A model's config with its weights, or an adapter's config with its weights (not a save cut short)."""
    if (folder / ADAPTER_CONFIG).is_file():
        return any((folder / f"adapter_model.{ext}").is_file() for ext in ("safetensors", "bin"))
    if (folder / "config.json").is_file():
        return any(folder.glob("model*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    return False


def _run_base(run: Path) -> ModelConfig | None:
    """The ``model:`` of the recipe a run was trained with (``swift-study train`` writes it into the run)."""
    recipe = run / CONFIG_FILE
    if not recipe.is_file():
        return None
    data = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    return build(ModelConfig, data.get("model"), f"{recipe}: model") if isinstance(data, dict) else None


def _adapter_base(checkpoint: Path) -> ModelConfig:
    """The base recorded in a LoRA checkpoint's adapter config; for full weights the folder itself."""
    config = checkpoint / ADAPTER_CONFIG
    if not config.is_file():
        return ModelConfig(str(checkpoint))
    name = yaml.safe_load(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not name:
        raise ConfigError(f"{checkpoint}: its adapter does not record its base model; give base_model")
    return ModelConfig(name)


@dataclass
class EvalResults:
    """What an evaluation found.

    Attributes:
        table: One row per (model, set, task), plus ``task == "all"``: accuracy and its Wilson interval, with
            the counts of examples without an answer, cut short, or undecided (see ``TABLE_COLUMNS``).
        records: Per-example records by ``(model label, set name)``.
        output_dir: Where ``results.csv`` and the records are.
    """

    table: pd.DataFrame
    records: dict[tuple[str, str], dict[str, ExampleRecord]] = field(default_factory=dict)
    output_dir: Path | None = None
    confidence: float = 0.95

    def correctness(self, model: str, set_name: str) -> dict[str, bool]:
        """Correctness by example id of the decided examples of ``model`` on ``set_name``."""
        records = self.records[(model, set_name)]
        return {i: bool(r.correct) for i, r in records.items() if r.correct is not None}

    def difference(self, model: str, reference: str, set_name: str) -> Interval:
        """Accuracy of ``model`` minus ``reference`` on ``set_name``, paired by example, with Newcombe's interval."""
        return paired_proportions(self.correctness(model, set_name), self.correctness(reference, set_name),
                                  self.confidence)  # fmt: skip


def evaluate(config: EvaluateConfig) -> EvalResults:
    """Evaluates every model of ``config`` on every set; reuses cached records, writes ``results.csv``.

    Raises:
        UserError: A config, set, model or judge problem (one line naming it).
    """
    config.check_complete()
    out = Path(config.output_dir)
    targets = resolve_targets(config.models, config.base_model, config.final_only)
    examples = {s.name: read_examples(s) for s in config.sets}
    judge = build_judge(config.judge, out / "judge-cache") if config.judge is not None else None
    metrics = {s.name: make_metric(s, judge) for s in config.sets}
    records: dict[tuple[str, str], dict[str, ExampleRecord]] = {}
    judge_checked = False
    for target in targets:
        files = {s.name: _record_file(out, target, s, metrics[s.name].settings()) for s in config.sets}
        todo = {name: _todo(f, examples[name]) for name, f in files.items()}
        if any(todo.values()):
            if (
                judge is not None
                and not judge_checked
                and any(todo[s.name] for s in config.sets if s.metric == "judge")
            ):
                check_judge(judge)  # before loading a model: a judge that is down fails in seconds, not a batch later
                judge_checked = True
            _evaluate_target(target, config, examples, metrics, files, todo)
        for name, f in files.items():
            records[(target.label, name)] = {e.id: f.records[e.id] for e in examples[name]}
    table = summarize(targets, config, records)
    _write_table(out / RESULTS_FILE, table)
    _warn_undecided(table)
    return EvalResults(table, records, out, config.confidence)


def _todo(records: RecordFile, examples: list[EvalExample]) -> list[str]:
    """Ids without a record, and those whose judge request failed (a passing outage, not the judge's answer)."""
    failed = {i for i, r in records.records.items() if r.correct is None and str(r.detail).startswith(JUDGE_FAILED)}
    return [e.id for e in examples if e.id not in records.records or e.id in failed]


def _record_file(out: Path, target: Target, s: EvalSetConfig, settings: Mapping[str, Any]) -> RecordFile:
    header = {"model": target.label, "identity": target.identity(), "set": s.name,
              "set_file": _set_digest(s), "limit": s.limit, **settings}  # fmt: skip
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", target.label).strip("_") or "model"
    return RecordFile(out / RECORDS_DIR / s.name / f"{safe}.{fingerprint(header)}.jsonl", header)


def _set_digest(s: EvalSetConfig) -> str:
    if s.path.startswith(DEMO_PREFIX):
        rows = json.dumps(set_rows(s), sort_keys=True, ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(rows).hexdigest()
    return file_digest(s.path)


def _evaluate_target(target, config, examples, metrics, files, todo) -> None:
    from tqdm.auto import tqdm

    tokenizer, model = target.load()
    try:
        for name, ids in todo.items():
            wanted = set(ids)
            pending = [e for e in examples[name] if e.id in wanted]
            with tqdm(total=len(pending), desc=f"{target.label} · {name}", disable=not config.progress) as bar:
                for start in range(0, len(pending), config.batch_size):
                    batch = pending[start : start + config.batch_size]
                    files[name].append(metrics[name].score(model, tokenizer, batch))
                    bar.update(len(batch))
    finally:
        del model
        gc.collect()


def build_judge(config: JudgeConfig, cache_dir: Path) -> Judge:
    """The judge's generator (its answers cached in ``cache_dir``)."""
    if config.backend == "openai":
        from ..generation.factory import api_key_from_env
        from ..generation.openai_backend import OpenAICompatibleBackend

        backend = OpenAICompatibleBackend(config.base_url, config.model, api_key=api_key_from_env(config.api_key_env),
                                          timeout=config.timeout, max_retries=config.max_retries)  # fmt: skip
        identity = f"openai:{config.base_url}:{config.model}"
    elif config.backend == "transformers":
        from ..generation.transformers_backend import TransformersBackend

        backend = TransformersBackend(config.model)
        identity = f"transformers:{getattr(backend, 'cache_identity', None) or config.model}"
    else:
        backend = make_backend(config.backend, config.model)
        identity = f"{config.backend}:{config.model}"
    return Judge(Generator(backend, cache_dir, progress=False, desc="judge"), identity, config.max_tokens)


def check_judge(judge: Judge) -> None:
    """One short request to the judge, answered by the backend itself (never the cache), without retries.

    Raises:
        JudgeError: The judge did not answer (the message says why).
    """
    backend = judge.generator.backend
    saved = getattr(backend, "max_retries", None)
    if saved is not None:
        backend.max_retries = 0
    try:
        request = GenerationRequest.chat("judge-check", [{"role": "user", "content": "Reply with: Verdict: Yes"}],
                                         SamplingParams(temperature=0.0, max_tokens=8))  # fmt: skip
        result = next(iter(backend.generate([request])))
    finally:
        if saved is not None:
            backend.max_retries = saved
    if not result.ok:
        raise JudgeError(f"the judge {judge.identity} does not answer: {result.error}")


def summarize(
    targets: list[Target], config: EvaluateConfig, records: Mapping[tuple[str, str], Mapping[str, ExampleRecord]]
) -> pd.DataFrame:
    """The accuracy table (``TABLE_COLUMNS``): per model, set and task, and over the whole set (``task == "all"``)."""
    rows = []
    for target in targets:
        for s in config.sets:
            recs = list(records[(target.label, s.name)].values())
            tasks = sorted({r.task for r in recs} - {ALL_TASKS})
            for task in [ALL_TASKS, *tasks]:
                mine = recs if task == ALL_TASKS else [r for r in recs if r.task == task]
                rows.append(_row(target, s, task, mine, config))
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _row(target: Target, s: EvalSetConfig, task: str, recs: list[ExampleRecord], config: EvaluateConfig) -> dict:
    decided = [float(r.correct) for r in recs if r.correct is not None]
    iv = wilson_interval(int(sum(decided)), len(decided), config.confidence)
    return {"model": target.label, "run": target.run, "step": target.step, "set": s.name, "metric": s.metric,
            "task": task, "n": len(recs), "decided": len(decided), "correct": int(sum(decided)), "accuracy": iv.value,
            "ci_low": iv.low, "ci_high": iv.high, "no_answer": sum(r.prediction is None for r in recs),
            "truncated": sum(r.truncated for r in recs), "undecided": len(recs) - len(decided)}  # fmt: skip


def _write_table(path: Path, table: pd.DataFrame) -> None:
    write_atomic(path, table.to_csv(index=False))


def _warn_undecided(table: pd.DataFrame) -> None:
    for row in table[(table.task == ALL_TASKS) & (table.undecided > 0)].itertuples():
        logger.warning("%s on %s: %d of %d examples undecided (the judge failed or gave no verdict); accuracy "
                       "is over the %d decided", row.model, row.set, row.undecided, row.n, row.decided)  # fmt: skip


def format_table(table: pd.DataFrame, tasks: bool = False) -> str:
    """The table as aligned text for the console (over whole sets unless ``tasks``)."""
    view = table if tasks else table[table.task == ALL_TASKS]
    lines = []
    for row in view.itertuples():
        acc = "undecided" if row.accuracy is None or pd.isna(row.accuracy) else (
            f"{row.accuracy:6.1%} [{row.ci_low:.1%}, {row.ci_high:.1%}]")  # fmt: skip
        extra = ", ".join(f"{n} {what}" for n, what in ((row.no_answer, "without an answer"),
                          (row.truncated, "cut short"), (row.undecided, "undecided")) if n)  # fmt: skip
        name = row.set if not tasks or row.task == ALL_TASKS else f"{row.set}/{row.task}"
        lines.append(
            f"{row.model:<32} {name:<20} {row.metric:<11} n={row.n:<5} {acc}" + (f"  ({extra})" if extra else "")
        )
    return "\n".join(lines)


__all__ = ["EvalExample", "EvalResults", "Target", "evaluate", "format_table", "resolve_targets", "summarize"]
