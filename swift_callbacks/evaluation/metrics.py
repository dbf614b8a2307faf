"""How an example is scored, one registered class per metric (``exact_match``, ``choice``, ``judge``).

A metric scores one batch of examples on a loaded model and returns one :class:`ExampleRecord` per example. Its
:meth:`Metric.settings` go into the records' fingerprint, so changing one re-evaluates instead of reusing stale
results. A new metric is a subclass with ``@register_metric``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..answers import final_answer, parse_final_verdict, same_answer
from ..errors import UserError
from ..generation import GenerationRequest, Generator, SamplingParams
from .config import EvalSetConfig
from .examples import LETTERS, EvalExample
from .inference import generate, option_ids, prompt_ids, sequence_logprobs
from .records import ExampleRecord

METRIC_CLASSES: dict[str, type[Metric]] = {}

JUDGE_PROMPT_VERSION = "judge-v1"
# The version of the final-answer reader (swift_callbacks.answers) in exact_match's cache key: a change of how
# replies are read makes earlier records stale. v4: with last_number, "7 + 14 = 21" answers 21. v5: words that
# change or hedge a number, LaTeX/Unicode number forms, abbreviations inside an answer.
READER = "final_answer-v5"
JUDGE_PROMPT = """You are grading an answer to a question against the reference answer.

Question:
{question}

Reference answer:
{reference}

Answer to grade:
{output}

Is the final answer of the answer to grade correct, that is, does it agree with the reference answer? Ignore \
style, length and the working; judge only the final answer. Reply with one line of reasoning, then a last line \
that is exactly "Verdict: Yes" or "Verdict: No"."""


JUDGE_FAILED = "judge request failed"  # the detail of an example whose judge request failed (redone on a rerun)


class JudgeError(UserError):
    """The judge could not be reached or refused every request; the message says which and why."""


@dataclass
class Judge:
    """The LLM judge: a generator (backend with its cache), its identity in fingerprints, its reply cap."""

    generator: Generator
    identity: str
    max_tokens: int = 512


def register_metric(cls: type[Metric]) -> type[Metric]:
    """Class decorator: makes ``cls`` available as ``metric: <cls.name>`` in evaluation sets."""
    METRIC_CLASSES[cls.name] = cls
    return cls


class Metric:
    """Scores batches of examples on a loaded model."""

    name: ClassVar[str]

    def __init__(self, config: EvalSetConfig, judge: Judge | None = None) -> None:
        self.config = config
        self.judge = judge

    def settings(self) -> dict[str, Any]:
        """What, besides the model and the set's content, decides this metric's results."""
        return {"metric": self.name}

    def score(self, model: Any, tokenizer: Any, examples: list[EvalExample]) -> list[ExampleRecord]:
        raise NotImplementedError


@register_metric
class ExactMatch(Metric):
    """Greedy generation; the final answer (``\\boxed{}``, ``####``, "the answer is", or a one-line reply) equals
    the gold one, numbers by value."""

    name = "exact_match"

    def settings(self) -> dict[str, Any]:
        return {"metric": self.name, "max_new_tokens": self.config.max_new_tokens,
                "last_number": self.config.last_number, "case_sensitive": self.config.case_sensitive,
                "reader": READER}  # fmt: skip

    def score(self, model: Any, tokenizer: Any, examples: list[EvalExample]) -> list[ExampleRecord]:
        outputs = generate(model, tokenizer, [prompt_ids(tokenizer, e) for e in examples], self.config.max_new_tokens)
        records = []
        for example, out in zip(examples, outputs, strict=True):
            predicted = final_answer(out.text, last_number=self.config.last_number)
            correct = same_answer(predicted, example.gold, case_sensitive=self.config.case_sensitive)
            records.append(ExampleRecord(example.id, example.task, correct, predicted,
                                         example.gold, out.text, out.truncated))  # fmt: skip
        return records


@register_metric
class Choice(Metric):
    """Multiple choice: the option with the highest log-likelihood after the prompt, read as its letter (MMLU
    style, ``scoring: letter``) or as its own text completing the prompt (``scoring: text``)."""

    name = "choice"

    def settings(self) -> dict[str, Any]:
        return {"metric": self.name, "scoring": f"{self.config.scoring}-logprob-v1"}

    def score(self, model: Any, tokenizer: Any, examples: list[EvalExample]) -> list[ExampleRecord]:
        contexts, options, owners = [], [], []
        for index, example in enumerate(examples):
            context, letters = option_ids(tokenizer, example, prompt_ids(tokenizer, example), self.config.scoring)
            contexts += [context] * len(letters)
            options += letters
            owners += [index] * len(letters)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        scores = sequence_logprobs(model, contexts, options, pad)
        records = []
        for index, example in enumerate(examples):
            mine = [s for s, owner in zip(scores, owners, strict=True) if owner == index]
            chosen = LETTERS[max(range(len(mine)), key=mine.__getitem__)]
            detail = {LETTERS[i]: round(s, 4) for i, s in enumerate(mine)}
            records.append(ExampleRecord(example.id, example.task, chosen == example.gold, chosen, example.gold,
                                         detail=detail))  # fmt: skip
        return records


@register_metric
class Judged(Metric):
    """Greedy generation judged by an LLM against the golden answer; the verdict is read strictly (a last line
    "Verdict: Yes/No"); no verdict or a failed request leaves the example undecided (counted, never guessed)."""

    name = "judge"

    def settings(self) -> dict[str, Any]:
        judge = self.judge.identity if self.judge is not None else None
        return {"metric": self.name, "max_new_tokens": self.config.max_new_tokens, "prompt": JUDGE_PROMPT_VERSION,
                "judge": judge}  # fmt: skip

    def score(self, model: Any, tokenizer: Any, examples: list[EvalExample]) -> list[ExampleRecord]:
        assert self.judge is not None, "the judge metric needs a judge"
        outputs = generate(model, tokenizer, [prompt_ids(tokenizer, e) for e in examples], self.config.max_new_tokens)
        params = SamplingParams(temperature=0.0, max_tokens=self.judge.max_tokens)
        requests = [
            GenerationRequest.chat(e.id, [{"role": "user", "content": JUDGE_PROMPT.format(
                question=e.question_text(), reference=e.reference, output=out.text)}], params)
            for e, out in zip(examples, outputs, strict=True)
        ]  # fmt: skip
        verdicts = self.judge.generator.run(requests)
        failed = [r.error for r in verdicts.values() if not r.ok]
        if failed and len(failed) == len(requests):
            raise JudgeError(f"the judge failed on every request of a batch of set {self.config.name!r}: {failed[0]}")
        return [_judged(e, out, verdicts[e.id]) for e, out in zip(examples, outputs, strict=True)]


def _judged(example: EvalExample, out: Any, result: Any) -> ExampleRecord:
    if not result.ok:
        verdict, detail = None, f"{JUDGE_FAILED}: {result.error}"
    else:
        verdict = parse_final_verdict(result.texts[0]) if result.texts else None
        detail = result.texts[0] if result.texts else "empty judge reply"
        if verdict is None:
            detail = f"judge gave no verdict: {detail[-200:]}"
    return ExampleRecord(example.id, example.task, verdict, final_answer(out.text), example.gold, out.text,
                         out.truncated, detail)  # fmt: skip


def make_metric(config: EvalSetConfig, judge: Judge | None = None) -> Metric:
    """The metric object of an evaluation set."""
    return METRIC_CLASSES[config.metric](config, judge)
