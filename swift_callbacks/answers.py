"""Strict readers of model replies: the visible reply, the final answer (``\\boxed{}``, ``####``, "the answer is"),
answer equality, a final Yes/No verdict, a final-marker rewrite.

Each reader returns what it found or ``None``; it never guesses. A reply that does not follow the requested format
is treated as carrying no answer, because a silent fallback (the first "yes" anywhere, an unbalanced box cut
short) turns formatting noise into wrong labels.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from fractions import Fraction

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
BOX_COMMANDS = ("\\boxed", "\\fbox")
# Characters peeled from both ends of a verdict line: whitespace, Markdown emphasis, quotes, brackets.
_VERDICT_WRAP = " \t*_`\"'“”‘’()[]"
_VERDICT_TRAIL = ".!。！"
# An optional label before the verdict word, e.g. "Verdict: Yes" or "**Final answer:** No".
_VERDICT_LINE = re.compile(
    r"^(?:(?:final\s+)?(?:answer|verdict|judg(?:e)?ment|decision)\s*[:：-]\s*)?(yes|no)$", re.IGNORECASE
)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")
_GROUPED_NUMBER = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?%?")


def clean_reply(text: str) -> str:
    """The visible answer of a reply: the text after the last ``</think>`` (reasoning models behind
    OpenAI-compatible servers), stripped. A reply that opens a ``<think>`` block and never closes it (generation
    stopped inside the reasoning) has no answer: the empty string."""
    close = text.rfind(_THINK_CLOSE)
    if close >= 0:
        return text[close + len(_THINK_CLOSE) :].strip()
    if text.lstrip().startswith(_THINK_OPEN):
        return ""
    return text.strip()


def boxed_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Braces nest (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``) and escaped braces (``\\{``, ``\\}``) do not
    count. Only the *last* box is the final answer: when its braces do not balance before the text ends, the reply
    has no final answer, even if an earlier box is well formed. An empty box is no answer either.

    Only the visible answer counts: the text after the last ``</think>``; a reply still inside an unclosed
    ``<think>`` block has no answer.

    Args:
        text: A model reply.

    Returns:
        The stripped content of the final box, or ``None``.
    """
    text = clean_reply(text)
    start = _last_box_start(text)
    if start is None:
        return None
    content = _balanced(text, start)
    if content is None:
        return None
    content = content.strip()
    return content or None


def _last_box_start(text: str) -> int | None:
    """Index just after the ``{`` of the last box command, or None."""
    best: int | None = None
    for command in BOX_COMMANDS:
        for match in re.finditer(re.escape(command) + r"\s*\{", text):
            if best is None or match.end() > best:
                best = match.end()
    return best


def _balanced(text: str, start: int) -> str | None:
    depth, pos = 1, start
    while pos < len(text):
        char = text[pos]
        if char == "\\":
            pos += 2  # an escaped character, "\{" and "\}" included, never opens or closes a group
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:pos]
        pos += 1
    return None


def normalize_answer(answer: str, *, case_sensitive: bool = False) -> str:
    """A canonical form of a final answer, so that equal answers written differently compare equal.

    Removes ``$``, ``\\left``/``\\right``, ``\\!``, ``\\,``, ``\\text{...}`` wrappers, spaces, thousands separators
    in numbers and a trailing period; turns ``\\dfrac``/``\\tfrac`` into ``\\frac``; and writes numbers (integers,
    decimals, ``a/b`` and ``\\frac{a}{b}`` with integer parts, percentages excluded) as reduced fractions, so
    ``0.5``, ``1/2`` and ``\\frac{1}{2}`` agree.

    Args:
        answer: An extracted answer.
        case_sensitive: Keep the case of text answers (by default "Paris" and "paris" agree).

    Returns:
        The canonical string (empty when nothing is left).
    """
    # NFKC keeps the minus sign and turns "½" into "1⁄2" (a fraction slash)
    text = unicodedata.normalize("NFKC", answer).strip().replace("\u2212", "-").replace("\u2044", "/")
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text).replace("\\%", "%")
    text = re.sub(r"\\[dt]?frac(\d)(\d)", r"\\frac{\1}{\2}", text)  # \frac12 is \frac{1}{2}
    for junk in ("$", "\\left", "\\right", "\\!", "\\,", "\\;", "\\ "):
        text = text.replace(junk, "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = "".join(text.split()).rstrip(".")
    if _GROUPED_NUMBER.fullmatch(text):  # "1,100" is 1100; "[1,100]" and "(2,500)" are pairs, left alone
        text = text.replace(",", "")
    number = _as_number(text)
    if number is not None:
        return _format_number(number)
    return text if case_sensitive else text.lower()


def _as_number(text: str) -> Fraction | None:
    match = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", text) or re.fullmatch(r"(-?)(\d+)/(-?\d+)", text)
    if match:
        sign, numerator, denominator = -1 if match.group(1) else 1, int(match.group(2)), int(match.group(3))
        return Fraction(sign * numerator, denominator) if denominator else None
    if re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)", text):
        return Fraction(text)
    return None


def _format_number(number: Fraction) -> str:
    return str(number.numerator) if number.denominator == 1 else f"{number.numerator}/{number.denominator}"


def majority_answer(answers: Iterable[str | None]) -> str | None:
    """The most frequent normalized answer (ties: the one seen first); ``None`` when no answer was given."""
    counts = Counter(normalize_answer(a) for a in answers if a is not None)
    counts.pop("", None)
    if not counts:
        return None
    best = max(counts.values())
    return next(answer for answer in counts if counts[answer] == best)


def parse_final_verdict(reply: str) -> bool | None:
    """Reads a Yes/No verdict from the end of a judge's reply, strictly.

    The verdict is read from the last non-empty line of the reply (after any leading ``<think>...</think>``
    block). That line, with Markdown emphasis (``*``, backticks) removed, quotes and brackets peeled from both ends
    and a trailing ``.`` or ``!`` dropped, must be exactly ``yes`` or ``no`` (any case), optionally after one label
    ``Answer:``, ``Final answer:``, ``Verdict:``, ``Judgement:`` or ``Decision:``. If it is not, the last sentence
    of that line
    is tried the same way (so "So the problem is well posed. Yes." reads as yes). Anything else — a hedge
    ("Yes, probably"), both words, a verdict only earlier in the text, no final line — is no verdict.

    Args:
        reply: The judge's reply.

    Returns:
        True for yes, False for no, None when there is no verdict (the caller must reject the row, not keep it).
    """
    lines = [line for line in clean_reply(reply).splitlines() if line.strip()]
    if not lines:
        return None
    last = lines[-1]
    for candidate in (last, _SENTENCE_SPLIT.split(last.strip())[-1]):
        verdict = _verdict_word(candidate)
        if verdict is not None:
            return verdict == "yes"
    return None


def _verdict_word(text: str) -> str | None:
    text = re.sub(r"[*`]", "", text)  # Markdown emphasis anywhere ("**Verdict:** Yes")
    previous = None
    while previous != text:  # peel "**Yes.**" or '"No"' layer by layer
        previous = text
        text = text.strip(_VERDICT_WRAP).rstrip(_VERDICT_TRAIL)
    match = _VERDICT_LINE.fullmatch(text)
    return match.group(1).lower() if match else None


def text_after_final_marker(reply: str, marker: str) -> str | None:
    """The text after the last line that starts with ``marker`` (e.g. ``"Final question:"``).

    The marker is matched case-insensitively at the start of a line, allowing Markdown decoration around it
    (``**Final question:**``, ``### Final question:``). The result is everything after the marker on that line and
    on the following lines, with a wrapping code fence or quotes removed.

    Args:
        reply: A model reply.
        marker: The marker the prompt asked for.

    Returns:
        The stripped text after the marker (possibly empty: an empty rewrite), or ``None`` when no line starts with
        the marker.
    """
    label = re.escape(marker.strip().rstrip(":：").strip())
    pattern = re.compile(rf"^[ \t>#*_]*{label}[ \t*_]*[:：][ \t*_]*", re.IGNORECASE | re.MULTILINE)
    text = clean_reply(reply)
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    return _unwrap(text[matches[-1].end() :])


def _unwrap(text: str) -> str:
    text = text.strip()
    fence = re.fullmatch(r"```[A-Za-z]*\n?(.*?)\n?```", text, re.DOTALL)
    if fence:
        text = fence.group(1).strip()
    if len(text) >= 2 and text[0] in "\"“'" and text[-1] in "\"”'":
        text = text[1:-1].strip()
    return text


# "The answer is 42", "Final answer: 42", "answer: **42**", "**Answer:** 42" — the last such statement counts.
_ANSWER_IS = re.compile(
    r"(?:the\s+(?:final\s+)?answer\s+is|final\s+answer[ \t*_]*[:：]|^[ \t>#*_-]*answer[ \t*_]*[:：])"
    r"[ \t*_]*[:：]?\s*(.+?)\s*$",
    re.IGNORECASE | re.MULTILINE,
)
# The last number of a reply: "23," is 23 and "10-12" ends with 12, not -12 (a sign only where no word precedes).
_LAST_NUMBER = re.compile(r"(?:(?<![\w.)])[-+])?\d(?:[\d,]*\d)?(?:\.\d+)?")
_HASHES = re.compile(r"####\s*(.*?)\s*$", re.MULTILINE)
_WRAPPERS = " \t*_`\"'“”$"
_SENTENCE_END = re.compile(r"(?<=[.。!！?？])\s+")  # "87. Easy." ends at "87."; "3.5" is one token
# Words whose period does not end a sentence ("Mr. Smith", "St. Louis"); single capitals are initials ("J. K.").
_ABBREVIATIONS = frozenset(
    ["mr", "mrs", "ms", "dr", "st", "mt", "jr", "sr", "prof", "vs", "etc", "no", "approx", "fig", "eq"]
)


def final_answer(reply: str, *, last_number: bool = False) -> str | None:
    """The final answer a reply states, read strictly.

    In order: the last ``\\boxed{...}``; the text after the last ``####`` (GSM8K); the text after the last "the
    answer is" / "final answer:" / a line starting "answer:"; otherwise the whole visible reply when it is one line
    (a short answer on its own, "87"). A multi-line reply without a marker has no final answer, unless
    ``last_number`` is set, which takes its last number (the lenient reading of GSM8K-style evaluations); with it,
    a one-line reply that is not a number itself but contains one ("7 + 14 = 21") answers with its last number.

    Args:
        reply: A model reply (or a reference answer written the same way).
        last_number: Fall back to the last number in a reply that has no marker.

    Returns:
        The answer text, stripped of emphasis, quotes, ``$`` and a closing period; ``None`` when there is none.
    """
    text = clean_reply(reply)
    if not text:
        return None
    if _last_box_start(text) is not None:
        return boxed_answer(text)
    for pattern in (_HASHES, _ANSWER_IS):
        matches = list(pattern.finditer(text))
        if matches:
            answer = matches[-1].group(1)
            while (later := pattern.search(answer)) is not None:  # "The answer is 3. No, the answer is 4."
                answer = later.group(1)
            return _tidy(_first_sentence(answer))
    numbers = _LAST_NUMBER.findall(text) if last_number else []
    if "\n" not in text:
        line = _tidy(text)
        # With last_number, "7 + 14 = 21" answers 21; a line that is a number already ("1/2", "18 dollars") or has
        # no digit ("Paris") is the answer as it stands.
        if numbers and line is not None and not _reads_as_number(line):
            return _tidy(numbers[-1])
        return line
    return _tidy(numbers[-1]) if numbers else None


def _reads_as_number(answer: str) -> bool:
    return _as_number(normalize_answer(answer)) is not None or bool(_LEADING_NUMBER.match(answer.strip()))


def _first_sentence(text: str) -> str:
    for match in _SENTENCE_END.finditer(text):
        before = text[: match.start()]
        word = re.search(r"(\w+)\.$", before)
        if word and (word.group(1).lower() in _ABBREVIATIONS or re.fullmatch(r"[A-Z]", word.group(1))):
            continue
        return before
    return text


def _tidy(answer: str) -> str | None:
    previous = None
    while previous != answer:  # peel "**87.**" or "$87$." layer by layer
        previous = answer
        answer = answer.strip(_WRAPPERS).rstrip(".。!！")
    return answer or None


def same_answer(predicted: str | None, gold: str, *, case_sensitive: bool = False) -> bool:
    """Whether a predicted final answer equals the gold one.

    Numbers compare by value (``"87.0"``, ``"1,000"``, ``"\\frac{1}{2}"`` = ``"0.5"``, ``"−3"`` = ``"-3"``); a
    numeric gold also matches a prediction that *starts* with that number followed by words without another digit
    ("18 dollars", "72, because ..."), never one that merely contains it, nor one whose words change or hedge it
    ("3 million", "2 dozen", "18 or more", "72, or 73"). Other text compares after
    :func:`normalize_answer` (case, ``$``, spaces ignored), except that spaces between digits count ("7 2" is not
    "72"). A one-letter option in parentheses ("(B)") is the letter. No prediction is never equal. With
    ``case_sensitive`` the case of text counts (a task whose answer *is* the case: "RAIN" is not "rain").
    """
    if predicted is None:
        return False
    predicted, gold = _option_letter(predicted.replace("\u2212", "-")), _option_letter(gold.replace("\u2212", "-"))
    want = normalize_answer(gold, case_sensitive=case_sensitive)
    if not want:
        return False
    if _DIGITS_APART.search(predicted) or _DIGITS_APART.search(gold):
        fold = str if case_sensitive else str.lower
        return " ".join(fold(predicted).split()) == " ".join(fold(gold).split())
    if normalize_answer(predicted, case_sensitive=case_sensitive) == want:
        return True
    lead = _LEADING_NUMBER.match(predicted.strip())
    if not lead or _as_number(want) is None or normalize_answer(lead.group(1)) != want:
        return False
    words = re.findall(r"[a-z]+", lead.group(3).lower())
    if lead.group(2).strip():  # "72, because it is more": a clause after a comma explains, unless it hedges
        words = words[:1]
    return not _CHANGES_THE_NUMBER.intersection(words)


_DIGITS_APART = re.compile(r"\d\s+\d")
# A number, then words without any other digit ("18 dollars", "72, because ..."; not "72.5", "1,000", "87 or 88").
_LEADING_NUMBER = re.compile(r"^([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+|/\d+)?)(\s+|,\s*|;\s*)(\D*)$")
# Words after a number that change or hedge it ("3 million", "2 dozen", "5 squared", "18 or more", "18 dollars and
# fifty cents", "72, or 73"): such a reply does not state the number on its own.
_CHANGES_THE_NUMBER = frozenset(
    [
        "or",
        "and",
        "plus",
        "minus",
        "times",
        "to",
        "more",
        "less",
        "than",
        "over",
        "under",
        "about",
        "around",
        "approximately",
        "roughly",
        "nearly",
        "almost",
        "least",
        "most",
        "squared",
        "cubed",
        "dozen",
        "dozens",
        "hundred",
        "hundreds",
        "thousand",
        "thousands",
        "million",
        "millions",
        "billion",
        "billions",
        "trillion",
        "half",
        "halves",
        "quarter",
        "quarters",
        "third",
        "thirds",
        "percent",
        "point",
        "k",
        "m",
        "bn",
    ]
)


def _option_letter(text: str) -> str:
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text).strip().strip("$")
    match = re.fullmatch(r"\s*\(([A-Za-z])\)\s*", text)
    return match.group(1) if match else text
