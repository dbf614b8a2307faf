"""Parsing of generator replies and the text normalization the builders' checks rely on.

Every parser either returns what it found or raises :class:`Rejection` with a short reason (counted in the build
summary) and a detail (written to the rejects file). Parsers are strict on purpose: a reply that does not follow
the requested format is more often wrong in other ways too, and a rejected row costs less than a bad one.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

import yaml

SHORT_ANSWER_MAX_CHARS = 32
# Closing punctuation, ASCII and CJK, ignored at the end of an answer or a verdict sentence.
_TRAILING = ".,;:!?。，、；：！？…"
_QUOTES = "\"'`“”‘’「」『』*_"
_NUMBER = re.compile(r"[-+]?(?:\d+(?:[.,]\d+)*|\.\d+)%?")
_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)
_FENCE = re.compile(r"```[ \t]*([A-Za-z]*)[ \t]*\n(.*?)\n?```", re.DOTALL)
# "1." "1)" "(1)" "1、" "①" or a bullet; "3.5 kg" and "**bold**" are not items.
_LIST_ITEM = re.compile(r"^\s*(?:[-*]\s|[•·]|\(?\d{1,3}(?:[.)、:：](?!\d))|\(\d{1,3}\)|[①-⑳])\s*(.*)$")
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|(?<=[。！？])|\n+")


class Rejection(Exception):
    """A row or reply that fails a check.

    Attributes:
        reason: Short, fixed category (e.g. ``"answer mismatch"``); counted in the summary.
        detail: Specifics for the rejects file.
        stage: ``"parse"`` (the reply does not have the requested form) or ``"check"`` (it has, but fails a check).
    """

    def __init__(self, reason: str, detail: str = "", *, stage: str = "check") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.stage = stage


def clean_reply(text: str) -> str:
    """Drops a leading ``<think>...</think>`` block (reasoning models behind OpenAI-compatible servers) and
    surrounding whitespace."""
    return _THINK.sub("", text, count=1).strip()


def normalize(text: str) -> str:
    """Normalizes text for comparison: Unicode NFKC, case-folded, whitespace collapsed, closing punctuation and
    wrapping quotes or Markdown emphasis removed at both ends."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    previous = None
    while previous != text:  # peel "**B.**" or '"yes."' layer by layer
        previous = text
        text = text.strip().strip(_QUOTES).rstrip(_TRAILING).strip()
    return text


def short_final_answer(response: str) -> str | None:
    """The answer a CoT response must end with, when the reference response is a short final answer.

    A reference counts as a short final answer when, stripped, it is a single line and either at most
    ``SHORT_ANSWER_MAX_CHARS`` characters long or a number. Longer or multi-line references (summaries, lists,
    rewritten text) have no single answer a reasoning-first reply could end with, so they get no check.

    Returns:
        The stripped reference, or ``None`` when it is not a short final answer.
    """
    text = response.strip()
    if not text or "\n" in text:
        return None
    if len(text) <= SHORT_ANSWER_MAX_CHARS or _NUMBER.fullmatch(text.replace(" ", "")):
        return text
    return None


def ends_with_answer(text: str, answer: str) -> bool:
    """Whether ``text`` ends with ``answer`` after :func:`normalize` (so "So the answer is **87**." ends with
    "87"), with a word boundary before it for alphanumeric answers ("187" does not end with "87")."""
    tail, want = normalize(text), normalize(answer)
    if not want or not tail.endswith(want):
        return False
    before = tail[: len(tail) - len(want)]
    return not (before and _is_word(before[-1]) and _is_word(want[0]))


def contains_phrase(text: str, phrase: str) -> bool:
    """Whether normalized ``phrase`` occurs in normalized ``text`` as a whole word sequence."""
    hay, needle = normalize(text), normalize(phrase)
    if not needle:
        return False
    start = hay.find(needle)
    while start >= 0:
        end = start + len(needle)
        left_ok = start == 0 or not (_is_word(hay[start - 1]) and _is_word(needle[0]))
        right_ok = end == len(hay) or not (_is_word(hay[end]) and _is_word(needle[-1]))
        if left_ok and right_ok:
            return True
        start = hay.find(needle, start + 1)
    return False


def numbers(text: str) -> list[str]:
    """The numbers written in digits in ``text`` (e.g. ``["3", "4.5", "1,000"]``)."""
    return [m.group(0).lstrip("+-") for m in _NUMBER.finditer(unicodedata.normalize("NFKC", text))]


def _is_word(char: str) -> bool:
    return char.isascii() and char.isalnum()


def parse_list(reply: str) -> list[str]:
    """Parses a numbered or bulleted list (``1.``, ``1)``, ``(1)``, ``1、``, ``-``, ``*``, ``•``, ``①``).

    Lines before the first item (a preamble) are ignored; a line directly under an item, or indented, continues
    that item; a blank line followed by an unmarked line ends the list (a closing remark is not a requirement).

    Raises:
        Rejection: ``"not a list"`` when no line is a list item, ``"empty list"`` when every item is empty.
    """
    items: list[str] = []
    after_blank = False
    for line in clean_reply(reply).splitlines():
        match = _LIST_ITEM.match(line)
        if match:
            items.append(match.group(1).strip())
        elif not line.strip():
            after_blank = True
            continue
        elif items and (not after_blank or line[:1].isspace()):
            items[-1] = f"{items[-1]} {line.strip()}".strip()
        elif items:
            break
        after_blank = False
    if not items:
        raise Rejection("not a list", _excerpt(reply), stage="parse")
    items = list(dict.fromkeys(item for item in items if item))  # drop empties and repeats, keep order
    if not items:
        raise Rejection("empty list", _excerpt(reply), stage="parse")
    return items


def final_sentence(text: str) -> str:
    """The last non-empty sentence (or line) of ``text``."""
    parts = [p.strip() for p in _SENTENCE_END.split(clean_reply(text).rstrip(_TRAILING + _QUOTES + " \n"))]
    parts = [p for p in parts if p]
    return parts[-1] if parts else ""


def parse_verdict(text: str, passing: list[str], failing: list[str]) -> bool:
    """Reads a judgement's verdict strictly from its final sentence.

    The final sentence must end with one of the ``passing`` or ``failing`` phrases (compared after
    :func:`normalize`); a verdict stated earlier, or hedged at the end, does not count.

    Returns:
        True for a passing verdict, False for a failing one.

    Raises:
        Rejection: ``"no verdict"`` when the final sentence ends with none of the phrases.
    """
    last = final_sentence(text)
    # Failing phrases first: in some languages the failing phrase contains the passing one ("不满足" vs "满足").
    if any(ends_with_answer(last, phrase) for phrase in failing):
        return False
    if any(ends_with_answer(last, phrase) for phrase in passing):
        return True
    raise Rejection("no verdict", f"final sentence: {last[:200]!r}", stage="parse")


def parse_labeled_pair(reply: str, first: str, second: str) -> tuple[str, str]:
    """Parses a reply of the form ``<first>: ...`` then a line ``<second>: ...`` (colon ASCII or full-width).

    The reply must start with the first label and hold the second label at the start of exactly one line;
    anything before the first label (a preamble) makes it malformed.

    Raises:
        Rejection: ``"malformed reply"`` for any other shape, or an empty part.
    """
    text = clean_reply(reply)
    head = re.compile(rf"^\s*\**{re.escape(first)}\**\s*[:：]\**\s*", re.IGNORECASE)
    split = re.compile(rf"^\s*\**{re.escape(second)}\**\s*[:：]\**[ \t]*", re.IGNORECASE | re.MULTILINE)
    match = head.match(text)
    if not match:
        raise Rejection("malformed reply", f"does not start with '{first}:': {_excerpt(text)}", stage="parse")
    body = text[match.end() :]
    seconds = list(split.finditer(body))
    if len(seconds) != 1:
        raise Rejection(
            "malformed reply", f"expected one '{second}:' line, found {len(seconds)}: {_excerpt(text)}", stage="parse"
        )
    query, answer = body[: seconds[0].start()].strip(), body[seconds[0].end() :].strip()
    if head.match(answer) or not query or not answer:
        raise Rejection("malformed reply", f"empty or repeated part: {_excerpt(text)}", stage="parse")
    return query, answer


def parse_structured(reply: str) -> Any:
    """Parses YAML or JSON from a reply: the content of its single fenced code block, or the whole reply.

    Raises:
        Rejection: ``"malformed reply"`` for several code blocks or text that does not parse.
    """
    text = clean_reply(reply)
    blocks = _FENCE.findall(text)
    if len(blocks) > 1:
        raise Rejection("malformed reply", f"{len(blocks)} code blocks, expected one", stage="parse")
    body = blocks[0][1] if blocks else text
    try:
        return json.loads(body)
    except ValueError:
        pass
    try:
        return yaml.safe_load(body)
    except yaml.YAMLError as err:
        raise Rejection("malformed reply", f"not YAML or JSON: {str(err).splitlines()[0]}", stage="parse") from err


def strip_answer_text(reply: str, labels: tuple[str, ...] = ()) -> str:
    """The bare text of a one-part reply: code fences, one leading label (e.g. "Rewritten question:") and
    wrapping quotes removed."""
    text = clean_reply(reply)
    fenced = _FENCE.fullmatch(text)
    if fenced:
        text = fenced.group(2).strip()
    for label in labels:
        match = re.match(rf"^\s*\**{re.escape(label)}\**\s*[:：]\**\s*", text, re.IGNORECASE)
        if match:
            text = text[match.end() :]
            break
    text = text.strip()
    if len(text) >= 2 and text[0] in "\"“'" and text[-1] in "\"”'":
        text = text[1:-1].strip()
    return text


def _excerpt(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit] + "...")
