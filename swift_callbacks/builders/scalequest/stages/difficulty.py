"""The difficulty filter: fail-rate labels from a solver, a regression scorer trained on them, and the easiest
questions dropped by the scorer's predictions.

1. Labels. For each labelled question (all, or a seeded random subset), a solver writes ``samples`` step-by-step
   solutions. The fail rate is the fraction of samples whose final ``\\boxed{}`` answer is missing or differs from
   the reference: the row's reference answer when ``answer_field`` is set (GSM8K ``#### 42``, a MATH solution's
   last box, or a bare answer), else the samples' majority answer. A question whose reference cannot be found
   (no reference answer; or, by majority, no sample with an answer) gets no label.
2. Scorer. A one-output sequence regression (``AutoModelForSequenceClassification``, ``num_labels=1``, MSE) is
   fine-tuned from the scorer model on (question, fail rate). It is saved next to the output
   (``<output stem>.scorer/``) and reused by a rerun with the same labels and settings. With ``scorer.train:
   false`` the scorer model is taken as an already trained difficulty scorer and no labels are made.
3. Filter. Every question is scored (through the generation cache, so scoring resumes too); the
   ``drop_easiest_fraction`` of them with the lowest predicted difficulty are dropped (ties broken by id).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from ....answers import boxed_answer, majority_answer, normalize_answer
from ....generation.base import GenerationResult, Message
from ...pipeline import Job, ask
from ...records import Reject
from ..backends import score_backend
from ..contract import StageError, StageResult, StageStats, finish, generation_counts, read_rows, score_rows
from ..contract import fingerprint as make_fingerprint
from ..metrics import distribution, histogram, ratio
from ..models import ModelSpec
from ..prompts import DEFAULT_PROMPTS, Prompts
from ..settings import Sampling, settings_dict
from ..training import check_overrides, train_regressor
from .base import OPTIONAL, REQUIRED, Stage, StageRun

SCORER_MARKER = "scalequest_scorer.json"


@dataclass(frozen=True)
class ScorerSettings:
    """How the difficulty scorer is made.

    Attributes:
        train: Fine-tune the scorer model on fail-rate labels (else use it as a trained scorer as it is).
        training: ``transformers.TrainingArguments`` fields over ``training.SCORER_DEFAULTS``.
        max_length: Question tokens the scorer reads.
    """

    train: bool = True
    training: dict[str, Any] = field(default_factory=dict)
    max_length: int = 512


@dataclass(frozen=True)
class DifficultySettings:
    """Settings of ``difficulty``.

    Attributes:
        samples: Solver samples per labelled question.
        question_field: The column holding the question.
        answer_field: Column of a reference answer, or None to compare with the samples' majority answer.
        label_rows: Label at most this many questions (a seeded random choice), or None for all.
        drop_easiest_fraction: Fraction of the questions, by predicted difficulty, dropped from the easy end.
        bins: Histogram bins of the difficulty distributions (over [0, 1]).
        seed: Seeds the choice of labelled questions and the solver's sampling.
        sampling: The solver's sampling.
        scorer: The scorer settings.
    """

    samples: int = 8
    question_field: str = "question"
    answer_field: str | None = None
    label_rows: int | None = None
    drop_easiest_fraction: float = 0.2
    bins: int = 10
    seed: int = 0
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.7, top_p=0.95, max_tokens=2048))
    scorer: ScorerSettings = field(default_factory=ScorerSettings)

    def __post_init__(self) -> None:
        if self.samples < 1 or self.bins < 1:
            raise ValueError("samples and bins must be at least 1")
        if not 0.0 <= self.drop_easiest_fraction < 1.0:
            raise ValueError(f"drop_easiest_fraction must be in [0, 1), got {self.drop_easiest_fraction}")
        if self.label_rows is not None and self.label_rows < 2:
            raise ValueError(f"label_rows must be at least 2 (or null for all), got {self.label_rows}")


def reference_answer(value: Any) -> str | None:
    """The final answer in a reference: a solution's last box, the part after GSM8K's ``####``, or the value."""
    if value is None:
        return None
    text = str(value)
    if "\\boxed" in text or "\\fbox" in text:
        return boxed_answer(text)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return text.strip() or None


def fail_rate(answers: list[str | None], reference: str | None) -> float | None:
    """The fraction of ``answers`` that are missing or differ from ``reference`` (the majority when None).

    Returns:
        The rate, or None when there is no reference to compare with.
    """
    reference = reference if reference is not None else majority_answer(answers)
    if reference is None or not answers:
        return None
    want = normalize_answer(reference)
    return sum(1 for a in answers if a is None or normalize_answer(a) != want) / len(answers)


def difficulty(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    solver: Any | None,
    scorer_model: ModelSpec | str,
    cache_dir: str | os.PathLike | None,
    settings: DifficultySettings = DifficultySettings(),
    prompts: Prompts = DEFAULT_PROMPTS,
    fingerprint: str | None = None,
) -> StageResult:
    """The ``difficulty`` stage (see the module docstring).

    Args:
        input: Input JSONL with the question column.
        output: Output JSONL: the kept rows with ``difficulty`` (predicted) and ``fail_rate`` (label, or None).
        solver: A Generator over the solver model (not needed when ``scorer.train`` is false).
        scorer_model: The scorer's base model (or the trained scorer, when ``scorer.train`` is false).
        cache_dir: The generation cache directory (scores are cached there too).
        settings: Stage settings.
        prompts: The prompt templates (``respond`` is the solver's prompt).
        fingerprint: The run's fingerprint (computed when None).

    Returns:
        The stage result; ``metrics`` hold the label and prediction distributions and histograms.

    Raises:
        StageError: A scorer to train without a solver, or fewer than 2 labelled questions.
    """
    from ....generation.runner import Generator

    started = time.perf_counter()
    spec = ModelSpec.parse(scorer_model, "difficulty.scorer_model")
    rows, rejects, rows_in = read_rows(input, [settings.question_field])
    metrics: dict[str, Any] = {}
    generation: dict[str, Any] = {}
    scorer_spec = spec
    if settings.scorer.train and rows:
        if solver is None:
            raise StageError("difficulty: training the scorer needs a solver model")
        labels = _labels(rows, solver, settings, prompts, metrics)
        generation["solver"] = generation_counts(solver)
        scorer_spec = _trained_scorer(rows, labels, spec, output, settings, metrics)
        for row in rows:
            row["fail_rate"] = labels.get(row["id"])
    backend = score_backend(scorer_spec, text_format="text", max_length=settings.scorer.max_length)
    with Generator(backend, cache_dir, desc="difficulty:scorer") as scorer:
        scored, dropped = score_rows(rows, scorer, partial(_question, settings.question_field), "difficulty",
                                     invalid=("generate", "scoring failed"))  # fmt: skip
        rejects += dropped
        generation["scorer"] = generation_counts(scorer)
    kept = _drop_easiest(scored, settings.drop_easiest_fraction, rejects, metrics)
    predicted = [r["difficulty"] for r in scored]
    metrics.update(predicted=distribution(predicted), predicted_histogram=histogram(predicted, settings.bins))
    stats = StageStats(
        stage="difficulty", unit="questions", rows_in=rows_in, rows_out=len(kept), metrics=metrics,
        generation=generation, settings=settings_dict(settings),
        fingerprint=fingerprint or make_fingerprint(
            "difficulty", {"settings": settings, "prompts": prompts}, [input],
            [getattr(getattr(solver, "backend", None), "model", ""), spec.identity()]),
    )  # fmt: skip
    return finish(output, kept, rejects, stats, started=started)


def _labels(
    rows: list[dict[str, Any]], solver: Any, settings: DifficultySettings, prompts: Prompts, metrics: dict[str, Any]
) -> dict[str, float]:
    """Fail-rate labels by row id; what could not be labelled is counted in ``metrics``."""
    chosen = rows
    if settings.label_rows is not None and settings.label_rows < len(rows):
        chosen = random.Random(settings.seed).sample(rows, settings.label_rows)
    jobs = [Job(r["id"], r["id"], r, prompts.messages("respond", r[settings.question_field])) for r in chosen]
    params = settings.sampling.params(settings.samples, settings.seed)
    outcomes, failed = ask(jobs, solver, partial(_label, settings), params)
    labels = {o["id"]: o["rate"] for o in outcomes if o["rate"] is not None}
    unlabelled = {"generation failed": len(failed), "no reference answer": len(outcomes) - len(labels)}
    with_answer = sum(a is not None for o in outcomes for a in o["answers"])
    total = sum(len(o["answers"]) for o in outcomes)
    metrics.update(
        labelled=len(labels), unlabelled=unlabelled, solver_answer_presence_ratio=ratio(with_answer, total),
        reference="answer_field" if settings.answer_field else "majority",
        fail_rate=distribution(list(labels.values())),
        fail_rate_histogram=histogram(list(labels.values()), settings.bins),
    )  # fmt: skip
    return labels


def _label(settings: DifficultySettings, job: Job, result: GenerationResult) -> list[dict[str, Any]]:
    """One question's sample answers and fail rate (None: no reference to compare with)."""
    # A reply cut at max_tokens has no final answer, whatever box its unfinished reasoning holds.
    texts = result.texts[: settings.samples]
    answers = [None if result.truncated(i) else boxed_answer(t) for i, t in enumerate(texts)]
    reference = reference_answer(job.raw.get(settings.answer_field)) if settings.answer_field else None
    rate = None if settings.answer_field and reference is None else fail_rate(answers, reference)
    return [{"id": job.key, "answers": answers, "rate": rate}]


def _trained_scorer(
    rows: list[dict[str, Any]],
    labels: dict[str, float],
    base: ModelSpec,
    output: str | os.PathLike,
    settings: DifficultySettings,
    metrics: dict[str, Any],
) -> ModelSpec:
    """Trains the scorer (or finds it trained by an earlier run with the same labels) and returns its spec."""
    if len(labels) < 2:
        raise StageError(
            f"difficulty: only {len(labels)} question(s) got a fail-rate label; the scorer needs 2 or more"
        )
    check_overrides("regression", settings.scorer.training, "difficulty.scorer.training")
    folder = Path(output).with_name(Path(output).stem + ".scorer")
    texts = [r[settings.question_field] for r in rows if r["id"] in labels]
    targets = [labels[r["id"]] for r in rows if r["id"] in labels]
    digest = hashlib.sha256(json.dumps([base.identity(), texts, targets, settings_dict(settings.scorer)],
                                       default=str).encode()).hexdigest()  # fmt: skip
    marker = folder / SCORER_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == digest:
        metrics["scorer"] = {"folder": str(folder), "reused": True}
    else:
        trained = train_regressor(texts, targets, base, folder, settings.scorer.training,
                                           settings.scorer.max_length, run_key=digest)  # fmt: skip
        marker.write_text(json.dumps({"fingerprint": digest, "base": base.identity(), **trained}, default=str))
        metrics["scorer"] = {"folder": str(folder), "reused": False, **trained}
    return ModelSpec("transformers", model=str(folder), fingerprint=digest, batch_size=base.batch_size,
                     device=base.device)  # fmt: skip


def _question(field_name: str, row: dict[str, Any]) -> list[Message]:
    return [{"role": "user", "content": row[field_name]}]


def _drop_easiest(
    scored: list[dict[str, Any]], fraction: float, rejects: list[Reject], metrics: dict[str, Any]
) -> list[dict[str, Any]]:
    """Drops ``floor(fraction * len)`` rows with the lowest predicted difficulty; keeps input order otherwise."""
    count = math.floor(fraction * len(scored))
    easiest = sorted(scored, key=lambda r: (r["difficulty"], r["id"]))[:count]
    dropped_ids = {r["id"] for r in easiest}
    threshold = easiest[-1]["difficulty"] if easiest else None
    for row in easiest:
        detail = f"predicted difficulty {row['difficulty']:.6g} (threshold {threshold:.6g})"
        rejects.append(Reject(row["id"], "filter", "among the easiest", row, detail))
    metrics.update(dropped_easiest=count, easiest_threshold=threshold)
    return [r for r in scored if r["id"] not in dropped_ids]


class Difficulty(Stage):
    name = "difficulty"
    settings = DifficultySettings
    roles: ClassVar[dict[str, str]] = {"solver": OPTIONAL, "scorer_model": REQUIRED}
    input_from = "filter-solvable"
    uses_prompts = True
    help = "fail-rate labels, a regression scorer, drop the easiest fraction"
    main_role = "solver"
    role_flags: ClassVar[dict[str, str]] = {"scorer_model": "--scorer-model"}
    sampling_field = "sampling"

    def check(self, settings: DifficultySettings, path: str) -> None:
        check_overrides("regression", settings.scorer.training, f"{path}.scorer.training")

    def run(self, run: StageRun, stack: ExitStack) -> StageResult:
        settings = run.settings
        solver = run.generator(stack, "solver") if run.models.get("solver") and settings.scorer.train else None
        return difficulty(run.input, run.output, solver=solver, scorer_model=run.model("scorer_model"),
                          cache_dir=run.cache_dir, settings=settings, prompts=run.prompts,
                          fingerprint=run.fingerprint)  # fmt: skip

    def headline(self, stats: StageStats) -> str:
        return f"dropped easiest {stats.metrics.get('dropped_easiest')}, labelled {stats.metrics.get('labelled')}"
