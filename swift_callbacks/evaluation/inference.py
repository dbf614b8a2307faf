"""The model side of evaluation: prompts tokenized as training saw them, greedy generation, option likelihoods.

A prompt is tokenized the way TRL's ``SFTTrainer`` tokenizes the prompt of a prompt-completion row (text: the
tokenizer's ``__call__``, special tokens included; chat: ``apply_chat_template`` with the generation prompt). When
the row carries its reference completion, the context is cut where the tokenized prompt and prompt+completion
part, as TRL does when they do not compose; so evaluation starts generating from exactly the context a trained
example's completion followed. ``tests/test_evaluation.py`` checks both against TRL's own preparation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .examples import LETTERS, EvalExample


def _tokenize(tokenizer: Any, content: Any, *, generation_prompt: bool) -> list[int]:
    if isinstance(content, str):
        return list(tokenizer(text=content)["input_ids"])
    messages = [{"role": role, "content": text} for role, text in content]
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
    )
    return list(encoded["input_ids"])


def prompt_ids(tokenizer: Any, example: EvalExample) -> list[int]:
    """The token ids the model continues for ``example`` (see the module docstring)."""
    ids = _tokenize(tokenizer, example.prompt, generation_prompt=example.is_chat)
    if example.completion is None or isinstance(example.prompt, str) != isinstance(example.completion, str):
        return ids
    full = _tokenize(tokenizer, example.prompt + example.completion, generation_prompt=False)
    return ids[: _common_prefix(ids, full)]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class Generation:
    """A greedy continuation: its text, and whether the token cap cut it before an end-of-sequence token."""

    text: str
    truncated: bool


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token id that ends a reply: the generation config's and the tokenizer's eos."""
    found: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if value is not None:
            found |= {value} if isinstance(value, int) else set(value)
    return found


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> list[Generation]:
    """Greedy continuations of a batch of tokenized prompts (left-padded, so each ends where generation starts)."""
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
        eos_token_id=sorted(eos) or None, temperature=None, top_p=None, top_k=None,
    )  # fmt: skip
    results = []
    for row in out[:, width:].tolist():
        cut = next((i for i, token in enumerate(row) if token in eos), None)
        tokens = row if cut is None else row[:cut]
        results.append(Generation(tokenizer.decode(tokens, skip_special_tokens=True), truncated=cut is None))
    return results


def option_ids(
    tokenizer: Any, example: EvalExample, context: list[int], scoring: str = "letter"
) -> tuple[list[int], list[list[int]]]:
    """The shared context and each option's tokens after it.

    ``letter``: the option letters. Chat prompts: the context as given, then the bare letter. Text prompts:
    ``prompt + " A"`` (no space after a prompt ending in whitespace) tokenized whole, as training tokenizes prompt
    and completion. ``text``: each option's own text as the completion, tokenized as training tokenizes a
    completion (chat: an assistant message, with the template's end-of-turn tokens; text: ``prompt + " " +
    option`` and the eos token). Where the option merges with the prompt's last tokens (``"Answer: "`` + ``"A"``
    -> ``" A"``), the context is cut back to what every option shares, so all options are scored from one context,
    like TRL's common prefix.
    """
    options = LETTERS[: len(example.choices)] if scoring == "letter" else example.choices
    if example.is_chat:
        if scoring == "letter":
            return context, [list(tokenizer(text=letter, add_special_tokens=False)["input_ids"]) for letter in options]
        fulls = [_tokenize(tokenizer, (*example.prompt, ("assistant", o)), generation_prompt=False) for o in options]
    else:
        glue = "" if example.prompt[-1:].isspace() else " "
        # A text completion ends with the eos token in training (TRL appends it), so "8" does not win over "87"
        # as a prefix of it would.
        end = (tokenizer.eos_token or "") if scoring == "text" else ""
        fulls = [_tokenize(tokenizer, f"{example.prompt}{glue}{o}{end}", generation_prompt=False) for o in options]
    start = min(_common_prefix(context, full) for full in fulls)
    return context[:start], [full[start:] for full in fulls]


@torch.inference_mode()
def sequence_logprobs(model: Any, contexts: list[list[int]], continuations: list[list[int]], pad: int) -> list[float]:
    """``log p(continuation | context)`` summed over the continuation's tokens, for each pair (one batch)."""
    seqs = [c + o for c, o in zip(contexts, continuations, strict=True)]
    width = max(len(s) for s in seqs)
    device = next(model.parameters()).device
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    scores = []
    for row, (context, option) in enumerate(zip(contexts, continuations, strict=True)):
        positions = torch.arange(len(context) - 1, len(context) + len(option) - 1, device=device)
        targets = torch.tensor(option, device=device)
        scores.append(float(logprobs[row, positions, targets].sum()))
    return scores
