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
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, ClassVar

from ...records import Reject
from ..contract import StageError, StageResult, StageStats, finish, read_rows
from ..contract import fingerprint as make_fingerprint
from ..metrics import distribution
from ..models import ModelSpec, load_tokenizer
from ..settings import settings_dict
from .base import REQUIRED, Stage, StageRun, TrainingStage, train_stage
from .generate import chat_prefix, training_prompt


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
        stage="qft-data", unit="questions", rows_in=rows_in, rows_out=len(kept),
        metrics={"prompt": prompt, "eos_token": eos,
                 "question_chars": distribution([len(r["question"]) for r in kept])},
        settings=settings_dict(settings),
        fingerprint=fingerprint or make_fingerprint("qft-data", {"settings": settings, "prompt": prompt, "eos": eos},
                                                    [input]),
    )  # fmt: skip
    return finish(output, kept, rejects, stats, started=started)


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
    return train_stage(Qft.name, "sft", input, output_dir, model=model, training=training,
                       required=Qft.required_columns, fingerprint=fingerprint)  # fmt: skip


class QftData(Stage):
    name = "qft-data"
    settings = QftDataSettings
    roles: ClassVar[dict[str, str]] = {"model": REQUIRED}
    input_required = True
    help = "questions-only SFT rows (prompt = chat prefix, completion = question + EOS) from a seed set"
    role_flags: ClassVar[dict[str, str]] = {"model": "--tokenizer"}

    def default_role(self, role: str, sections: Mapping[str, Any]) -> Any:
        # The tokenizer of the model QFT trains, unless given.
        return (sections.get(Qft.name) or {}).get("model") or super().default_role(role, sections)

    def run(self, run: StageRun, stack: ExitStack) -> StageResult:
        return qft_data(run.input, run.output, tokenizer=load_tokenizer(run.model("model")), settings=run.settings,
                        fingerprint=run.fingerprint)  # fmt: skip


class Qft(TrainingStage):
    name = "qft"
    roles: ClassVar[dict[str, str]] = {"model": REQUIRED}
    input_from = QftData.name
    trainer = "sft"
    help = "question fine-tuning: TRL SFT (1 epoch, packing, max length 256, lr 2e-5)"
    required_columns = ("prompt", "completion")
