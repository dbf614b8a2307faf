"""QPO (question preference optimization): make the QFT model prefer solvable, harder questions.

``qpo-pairs`` samples questions from the QFT model (chat prefix only), then, for each, picks one aspect at random
with a seeded RNG — solvability (a math-teacher prompt that solves, checks solvability and rewrites) or difficulty
(a make-it-harder prompt: methods, plan, rewrite, review) — and has a strong model rewrite it. The rewrite is read
after the prompt's final marker. Each usable rewrite gives one DPO pair: ``prompt`` = the chat prefix only,
``chosen`` = the rewrite, ``rejected`` = the original, both followed by the EOS text (as in the QFT data; TRL's
DPOTrainer adds no second one). Empty rewrites, rewrites without the marker, and rewrites equal to the original are
dropped and counted.

``qpo`` runs TRL's ``DPOTrainer`` on the pairs with the paper's settings (learning rate 5e-7, beta 0.1, 1 epoch,
batch 128).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

from ....answers import text_after_final_marker
from ....generation.base import GenerationResult
from ...pipeline import Job, ask
from ...records import Reject
from ..contract import StageResult, StageStats, finish, generation_counts
from ..contract import fingerprint as make_fingerprint
from ..metrics import ratio
from ..models import ModelSpec, load_tokenizer
from ..prompts import DEFAULT_PROMPTS, Prompts
from ..settings import Sampling, settings_dict
from .base import REQUIRED, Stage, StageRun, TrainingStage, train_stage
from .generate import GenerateSettings, chat_prefix, sample_questions, training_prompt
from .qft import Qft

ASPECTS = {"solvability": "solvability_rewrite", "difficulty": "difficulty_rewrite"}


@dataclass(frozen=True)
class QpoPairsSettings:
    """Settings of ``qpo-pairs``.

    Attributes:
        num_questions: Questions to sample from the QFT model (the paper: about 10K per generator).
        samples_per_request: Samples per generation request.
        solvability_probability: Chance that a question is rewritten for solvability (else for difficulty).
        seed: Seeds both the sampling and the aspect choice (per question id, so the choice does not depend on
            which other questions exist).
        system_prompt: A system message in the prefix, or None for the template's default.
        sampling: Question sampling (the paper's generation settings).
        rewrite_sampling: The rewriter's sampling.
    """

    num_questions: int = 10000
    samples_per_request: int = 16
    solvability_probability: float = 0.5
    seed: int = 0
    system_prompt: str | None = None
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=1.0, top_p=0.99, max_tokens=512))
    rewrite_sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.0, top_p=1.0, max_tokens=2048))

    def __post_init__(self) -> None:
        if not 0.0 <= self.solvability_probability <= 1.0:
            raise ValueError(f"solvability_probability must be in [0, 1], got {self.solvability_probability}")

    def generate_settings(self) -> GenerateSettings:
        return GenerateSettings(num_questions=self.num_questions, samples_per_request=self.samples_per_request,
                                seed=self.seed, system_prompt=self.system_prompt, id_prefix="qpo",
                                sampling=self.sampling)  # fmt: skip


def choose_aspect(seed: int, question_id: str, solvability_probability: float) -> str:
    """``"solvability"`` or ``"difficulty"`` for one question, from an RNG seeded by ``seed`` and its id."""
    draw = random.Random(f"{seed}/{question_id}").random()
    return "solvability" if draw < solvability_probability else "difficulty"


def qpo_pairs(
    output: str | os.PathLike,
    *,
    sampler: Any,
    rewriter: Any,
    prefix: str,
    prompt: str,
    eos_token: str,
    settings: QpoPairsSettings = QpoPairsSettings(),
    prompts: Prompts = DEFAULT_PROMPTS,
    fingerprint: str | None = None,
) -> StageResult:
    """The ``qpo-pairs`` stage: sampled questions, their rewrites, and the DPO pairs they make.

    The unit is the sampled question: ``rows_in`` = ``num_questions``; every question that gives no pair is a
    reject (``generation failed``, ``empty sample``, ``no final marker``, ``empty rewrite``,
    ``rewrite identical to original``).

    Args:
        output: Output JSONL: ``id``, ``prompt``, ``chosen``, ``rejected``, ``aspect``, ``original``, ``rewrite``.
        sampler: A Generator over the QFT model (prefix-capable backend).
        rewriter: A Generator over the strong model.
        prefix: The chat prefix the sampler continues (see :func:`~.generate.chat_prefix`).
        prompt: The DPO prompt (the prefix as a TRL prompt, see :func:`~.generate.training_prompt`).
        eos_token: The QFT model's EOS text.
        settings: Stage settings.
        prompts: The prompt templates (the two rewrite prompts and the final marker).
        fingerprint: The run's fingerprint (computed when None).

    Returns:
        The stage result; ``metrics.pairs_by_aspect`` and ``metrics.aspects_drawn`` count the aspects.
    """
    started = time.perf_counter()
    sampled, rejects = sample_questions(sampler, prefix, settings.generate_settings())
    jobs = []
    for row in sampled:
        if not row["question"]:
            rejects.append(Reject(row["id"], "generate", "empty sample", row))
            continue
        aspect = choose_aspect(settings.seed, row["id"], settings.solvability_probability)
        raw = {"id": row["id"], "question": row["question"], "aspect": aspect}
        jobs.append(Job(row["id"], row["id"], raw, prompts.messages(ASPECTS[aspect], row["question"])))
    read = partial(_pair, prompts.final_marker, prompt, eos_token)
    pairs, dropped = ask(jobs, rewriter, read, settings.rewrite_sampling.params())
    rejects += dropped
    stats = StageStats(
        stage="qpo-pairs", unit="sampled questions", rows_in=settings.num_questions, rows_out=len(pairs),
        metrics={"aspects_drawn": dict(Counter(j.raw["aspect"] for j in jobs)),
                 "pairs_by_aspect": dict(Counter(p["aspect"] for p in pairs)),
                 "pair_ratio": ratio(len(pairs), settings.num_questions)},
        generation={"sampler": generation_counts(sampler), "rewriter": generation_counts(rewriter)},
        settings=settings_dict(settings),
        fingerprint=fingerprint or make_fingerprint(
            "qpo-pairs", {"settings": settings, "prompts": prompts, "prefix": prefix, "prompt": prompt,
                          "eos": eos_token},
            models=[getattr(sampler.backend, "model", ""), getattr(rewriter.backend, "model", "")]),
    )  # fmt: skip
    return finish(output, pairs, rejects, stats, started=started)


def _pair(marker: str, prompt: str, eos: str, job: Job, result: GenerationResult) -> list[dict[str, Any] | Reject]:
    """The DPO pair of one rewrite, or the reject saying why there is none."""
    question, reply = job.raw["question"], result.texts[0]
    rewrite = text_after_final_marker(reply, marker)
    if rewrite is None:
        return [job.reject("parse", "no final marker", f"reply ends: {reply[-300:]!r}")]
    if not rewrite:
        return [job.reject("check", "empty rewrite", f"reply ends: {reply[-300:]!r}")]
    if " ".join(rewrite.split()).casefold() == " ".join(question.split()).casefold():
        return [job.reject("check", "rewrite identical to original")]
    return [{"id": job.key, "prompt": prompt, "chosen": rewrite + eos, "rejected": question + eos,
             "aspect": job.raw["aspect"], "original": question, "rewrite": rewrite}]  # fmt: skip


def train_qpo(
    input: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model: ModelSpec | str,
    training: Mapping[str, Any] | None = None,
    fingerprint: str | None = None,
) -> StageResult:
    """The ``qpo`` stage: DPO of the QFT model on the ``qpo-pairs`` rows; the result is saved to ``output_dir``.

    Args:
        input: The ``qpo-pairs`` output.
        output_dir: The model folder to write.
        model: The QFT model (spec string, mapping or :class:`ModelSpec`).
        training: ``trl.DPOConfig`` fields over the paper's settings (see ``training.QPO_DEFAULTS``).
        fingerprint: The run's fingerprint (computed when None).

    Returns:
        The stage result (``rows_out``: pairs trained on).
    """
    return train_stage(Qpo.name, "dpo", input, output_dir, model=model, training=training,
                       required=Qpo.required_columns, fingerprint=fingerprint)  # fmt: skip


class QpoPairs(Stage):
    name = "qpo-pairs"
    settings = QpoPairsSettings
    roles: ClassVar[dict[str, str]] = {"model": f"stage:{Qft.name}", "rewriter": REQUIRED}
    uses_prompts = True
    help = "sample questions from the QFT model, rewrite them for solvability or difficulty -> DPO pairs"
    main_role = "rewriter"
    role_flags: ClassVar[dict[str, str]] = {"model": "--sampler"}
    sampling_field = "rewrite_sampling"
    headline_metric = "pair_ratio"

    def run(self, run: StageRun, stack: ExitStack) -> StageResult:
        settings = run.settings
        tokenizer = load_tokenizer(run.model("model"))
        prefix = chat_prefix(tokenizer, settings.system_prompt)
        return qpo_pairs(
            run.output, sampler=run.generator(stack, "model"), rewriter=run.generator(stack, "rewriter"),
            prefix=prefix, prompt=training_prompt(tokenizer, prefix), eos_token=tokenizer.eos_token,
            settings=settings, prompts=run.prompts, fingerprint=run.fingerprint,
        )  # fmt: skip


class Qpo(TrainingStage):
    name = "qpo"
    roles: ClassVar[dict[str, str]] = {"model": f"stage:{Qft.name}"}
    input_from = QpoPairs.name
    trainer = "dpo"
    help = "question preference optimization: TRL DPO (lr 5e-7, beta 0.1, 1 epoch)"
    required_columns = ("prompt", "chosen", "rejected")
