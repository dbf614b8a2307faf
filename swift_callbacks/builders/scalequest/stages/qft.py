"""QFT (question fine-tuning): teach a model to write questions when given only the chat prefix of a user turn.

``qft-data`` turns a seed problem set (GSM8K/MATH-style rows with a question column) into TRL prompt-completion
rows: ``prompt`` is the chat prefix up to the user turn, ``completion`` is the question followed by the tokenizer's
EOS text. The EOS is written into the data, not left to the trainer: the file then means the same to any trainer,
and TRL (1.16), which appends ``eos_token`` to string completions that do not already end with it, adds nothing. A
model trained on it ends each question with EOS, which is where generation stops.

``qft`` runs TRL's ``SFTTrainer`` on those rows with the paper's settings (1 epoch, packing, max length 256,
learning rate 2e-5).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..records import Reject
from .contract import StageError, StageResult, StageStats, finish, read_rows
from .contract import fingerprint as make_fingerprint
from .generate import chat_prefix, training_prompt
from .metrics import distribution
from .models import ModelSpec
from .settings import settings_dict


@dataclass(frozen=True)
class QftDataSettings:
    """Settings of ``qft-data``.

    Attributes:
        question_field: The seed set's question column (``question`` for GSM8K, ``problem`` for MATH).
        system_prompt: A system message in the prefix, or None for the chat template's default.
        drop_duplicates: Drop repeated questions (compared after collapsing whitespace).
    """

    question_field: str = "question"
    system_prompt: str | None = None
    drop_duplicates: bool = True


def qft_data(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    tokenizer: Any,
    settings: QftDataSettings = QftDataSettings(),
    fingerprint: str | None = None,
) -> StageResult:
    """The ``qft-data`` stage: questions-only SFT rows from a seed problem set.

    Output rows: ``id``, ``prompt`` (the chat prefix, without a leading BOS text when the tokenizer adds BOS
    itself), ``completion`` (question + EOS text), ``question``. Rows without a question, with an empty one, or
    repeating an earlier one are rejects.

    Args:
        input: The seed set (JSONL/JSON/CSV/Parquet).
        output: Output JSONL.
        tokenizer: The tokenizer of the model QFT will train (chat template and EOS).
        settings: Stage settings.
        fingerprint: The run's fingerprint (computed when None).

    Returns:
        The stage result.

    Raises:
        StageError: The tokenizer has no chat template or no EOS token.
    """
    started = time.perf_counter()
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise StageError("the tokenizer has no EOS token to end the questions with")
    prompt = training_prompt(tokenizer, chat_prefix(tokenizer, settings.system_prompt))
    rows, rejects, rows_in = read_rows(input, [settings.question_field])
    kept, seen = [], set()
    for row in rows:
        question = row[settings.question_field].strip()
        key = " ".join(question.split())
        if not question:
            rejects.append(Reject(row["id"], "validate", "empty question", row))
        elif settings.drop_duplicates and key in seen:
            rejects.append(Reject(row["id"], "validate", "duplicate question", row))
        else:
            seen.add(key)
            kept.append({"id": row["id"], "prompt": prompt, "completion": question + eos, "question": question})
    stats = StageStats(
        "qft-data", unit="questions", rows_in=rows_in, rows_out=len(kept),
        metrics={"prompt": prompt, "eos_token": eos,
                 "question_chars": distribution([len(r["question"]) for r in kept])},
        settings=settings_dict(settings),
        fingerprint=fingerprint or make_fingerprint("qft-data", {"settings": settings, "prompt": prompt, "eos": eos},
                                                    [input]),
    )  # fmt: skip
    return finish(output, kept, rejects, stats, started=started)


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
    from . import training as trainers

    started = time.perf_counter()
    spec = ModelSpec.parse(model, f"{stage}.model")
    overrides = dict(training or {})
    trainers.check_overrides(kind, overrides, f"{stage}.training")
    rows, rejects, rows_in = read_rows(input, list(required))
    if not rows:
        raise StageError(f"{stage}: no usable training rows in {str(input)!r}")
    fingerprint = fingerprint or make_fingerprint(stage, overrides, [input], [spec.identity()])
    train = trainers.train_sft if kind == "sft" else trainers.train_dpo
    metrics = train(rows, spec, output_dir, overrides, run_key=fingerprint)
    stats = StageStats(stage, unit="examples", rows_in=rows_in, rows_out=len(rows), metrics=metrics,
                       settings={"model": spec.identity(), "training": overrides}, fingerprint=fingerprint)  # fmt: skip
    if not metrics.get("is_main_process", True):  # other ranks of a distributed run write nothing
        return StageResult(rows, rejects, stats)
    return finish(output_dir, None, rejects, stats, started=started)


def train_qft(
    input: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model: ModelSpec | str,
    training: Mapping[str, Any] | None = None,
    fingerprint: str | None = None,
) -> StageResult:
    """The ``qft`` stage: SFT of ``model`` on the ``qft-data`` rows; the trained model is saved to ``output_dir``.

    Args:
        input: The ``qft-data`` output.
        output_dir: The model folder to write.
        model: The model to fine-tune (spec string, mapping or :class:`ModelSpec`).
        training: ``trl.SFTConfig`` fields over the paper's settings (see ``training.QFT_DEFAULTS``).
        fingerprint: The run's fingerprint (computed when None).

    Returns:
        The stage result (``rows_out``: examples trained on).
    """
    return train_stage("qft", "sft", input, output_dir, model=model, training=training,
                       required=("prompt", "completion"), fingerprint=fingerprint)  # fmt: skip
