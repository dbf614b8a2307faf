"""Parsing of generator replies and the text normalization the builders' checks rely on.

Every parser either returns what it found or raises :class:`Rejection` with a short reason (counted in the build
summary) and a detail (written to the rejects file). Parsers are strict on purpose: a reply that does not follow
the requested format is more often wrong in other ways too, and a rejected row costs less than a bad one.
"""

from __future__ import annotations

import json
import re
import unicodedata
from fractions import Fraction
from typing import Any

import yaml

from ..answers import clean_reply, final_answer

SHORT_ANSWER_MAX_CHARS = 32
# Closing punctuation, ASCII and CJK, ignored at the end of an answer or a verdict sentence.
_TRAILING = ".,;:!?。，、；：！？…"
_QUOTES = "\"'`“”‘’「」『』*_"
_NUMBER = re.compile(r"[-+]?(?:\d+(?:[.,]\d+)*|\.\d+)%?")
_MARKED = re.compile(r"####|\\boxed\{|\bthe\s+(?:final\s+)?answer\s+is\b|\bfinal\s+answer\s*[:：]", re.IGNORECASE)
_OPTION = re.compile(r"\(([A-Za-z])\)")
_EXPLAINED = re.compile(r",\s|;\s|\s(?:because|since|as|which|so)\s", re.IGNORECASE)
# A number as a final answer: sign, thousands groups, decimals; optionally a fraction "a/b".
_NUM = r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
_ANSWER_NUMBER = re.compile(rf"(?<![\d.,/])({_NUM})(?:\s*/\s*({_NUM}))?%?(?![\d/]|[.,]\d)")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")
# A negation right before the final answer: "is not 87", "isn't 87", "≠ 87", "不是87".
_NEGATED = re.compile(
    r"(?:\b(?:not|never|no|false|incorrect|wrong)\b|n't|≠|!=|不是|不等于|并非)[\s:=*$`\"'“”]*"
    r"(?:(?:equal|equals|be|to|that|exactly|quite|just)\b[\s:=*$`\"'“”]*)*$",
    re.IGNORECASE,
)
_VERDICT_NEGATION = re.compile(
    r"\b(?:not|never|no|false|untrue|incorrect|wrong|fails?)\b|n't|不|没|並非|并非", re.IGNORECASE
)
_NON_BOUNDARY = "-./,"
_CJK_NUMERALS = "零〇一二三四五六七八九十百千万萬亿億两兩"
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

    A reference with an answer marker (``#### 72`` as GSM8K writes it, ``\\boxed{}``, "the answer is") gives the
    marked answer. Otherwise a reference counts as a short final answer when, stripped, it is a single line and
    either at most ``SHORT_ANSWER_MAX_CHARS`` characters long or a number; an option letter in parentheses is the
    letter. Longer or multi-line references (summaries, lists,
    rewritten text) have no single answer a reasoning-first reply could end with, so they get no check.

    Returns:
        The stripped reference, or ``None`` when it is not a short final answer.
    """
    text = response.strip()
    if _MARKED.search(text):  # GSM8K's "#### 72", "\boxed{72}", "The answer is 72": the marked answer counts
        text = final_answer(text) or ""
        if _EXPLAINED.search(text):  # "Paris, since 987 AD": not a bare answer a reply could end with
            return None
    if not text or "\n" in text:
        return None
    letter = _OPTION.fullmatch(text)
    if letter:  # "(B)" and "B" are the same option
        return letter.group(1)
    if len(text) <= SHORT_ANSWER_MAX_CHARS or _NUMBER.fullmatch(text.replace(" ", "")):
        return text
    return None


def ends_with_answer(text: str, answer: str) -> bool:
    """Whether the reply ``text`` gives ``answer`` as its final answer.

    A numeric answer (``"87"``, ``"-3.5"``, ``"1,000"``, ``"2/3"``) is compared by value with the last number of
    the reply, sign and decimals included ("-87", "1.87", "0.87" and "2/87" are not 87). Any other answer must end
    the reply after :func:`normalize` (so "So the answer is **B**." ends with "B"), with a boundary before it: a
    letter or digit, ``-``, ``.``, ``,`` or ``/`` right before an alphanumeric answer means it is part of a longer
    token ("187" does not end with "87", "十三" does not end with "三"). A negated answer ("The answer is not 87")
    never counts.
    """
    text = clean_reply(text)
    if len(answer.strip()) == 1 and answer.strip().isalpha():  # an option letter: "(B)." ends with "B" too
        text = re.sub(r"\(([A-Za-z])\)([^\w]*)$", r"\1\2", text.rstrip())
    value = _number_value(answer)
    if value is not None:
        return _last_number_is(text, value)
    tail, want = normalize(text), normalize(answer)
    if not want or not tail.endswith(want):
        return False
    before = tail[: len(tail) - len(want)]
    if _NEGATED.search(before.rstrip()):
        return False
    if not before:
        return True
    prev, first = before[-1], want[0]
    if first in _CJK_NUMERALS:
        return prev not in _CJK_NUMERALS and not prev.isdigit()
    if not (_is_word(first) or first in "+-."):
        return True
    return not (_is_word(prev) or prev.isdigit() or prev in _NON_BOUNDARY)


def _number_value(text: str) -> Fraction | None:
    """The value of a numeric answer (``"87"``, ``"$-3.5$"``, ``"1,000"``, ``"2/3"``, ``"\\frac{2}{3}"``), else None."""
    text = _plain_numbers(text).strip().strip("$").replace(" ", "").rstrip(".")
    match = _ANSWER_NUMBER.fullmatch(text)
    return _match_value(match) if match else None


def _plain_numbers(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).replace("\u2212", "-")
    return _LATEX_FRAC.sub(r"\1/\2", text)


def _match_value(match: re.Match[str]) -> Fraction | None:
    try:
        value = Fraction(match.group(1).replace(",", ""))
        if match.group(2) is not None:
            value /= Fraction(match.group(2).replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
    return value


def _last_number_is(text: str, value: Fraction) -> bool:
    text = _plain_numbers(text)
    found = list(_ANSWER_NUMBER.finditer(text))
    if not found:
        return False
    last = found[-1]
    if text[last.end() :].strip(_TRAILING + _QUOTES + " \t\n$\\)]}"):  # the reply goes on after its last number
        return False
    if _NEGATED.search(text[: last.start()].rstrip()):
        return False
    return _match_value(last) == value


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
    for phrase in passing:
        if ends_with_answer(last, phrase):
            # "It is false that the output meets ..." states the failing verdict with the passing phrase.
            before = normalize(last)[: -len(normalize(phrase))]
            if _VERDICT_NEGATION.search(before):
                raise Rejection("no verdict", f"negated verdict: {last[:200]!r}", stage="parse")
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


def is_cjk(char: str) -> bool:
    """Han ideographs and kana: scripts written without spaces between words."""
    code = ord(char)
    return (
        0x3040 <= code <= 0x30FF  # hiragana, katakana
        or 0x3400 <= code <= 0x4DBF  # CJK extension A
        or 0x4E00 <= code <= 0x9FFF  # CJK unified ideographs
        or 0xF900 <= code <= 0xFAFF  # compatibility ideographs
        or 0x20000 <= code <= 0x3FFFF  # extensions B and later
    )


def wrong_language(reply: str, lang: str) -> str | None:
    """Why ``reply`` is not in the language ``lang`` the template asked for (``en`` or ``zh``), or None.

    Judged on the letters of the visible reply: a Chinese reply needs at least 20% Han characters (English terms
    and formulas are common in it); an English one may hold at most 50% CJK characters. Replies without letters
    (numbers, symbols) pass.
    """
    letters = [c for c in clean_reply(reply) if c.isalpha()]
    if not letters or lang not in ("en", "zh"):
        return None
    share = sum(is_cjk(c) for c in letters) / len(letters)
    if lang == "zh" and share < 0.2:
        return f"the template asks for Chinese; {share:.0%} of the reply's letters are Chinese characters"
    if lang == "en" and share > 0.5:
        return f"the template asks for English; {share:.0%} of the reply's letters are CJK characters"
    return None
