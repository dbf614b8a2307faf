"""Deterministic generator for the demo's bundled JSONL data.

The demo trains a tiny causal LM on a small, procedurally generated instruction set (``base.jsonl``) and
tracks how three probe sets relate to it during training, following the CoT study layout of the swift study:

* ``cot_study_z.jsonl`` (Z): one plain (non-CoT) reference example per task.
* ``cot_study_z_similar.jsonl`` (Z'): one analogous plain example per task, with different operands.
* ``cot_study_z_cot.jsonl`` (Z''): the chain-of-thought version of each Z example, whose prompt is the Z
  prompt followed by :data:`COT_SUFFIX` and whose completion gives a short reason and then the same answer.

Every task has a short, checkable answer. Each row has the keys ``id``, ``task``, ``prompt``, ``completion``
and ``answer``. Prompts never end with whitespace and completions always start with a single space, so that a
byte-level BPE tokenizer cannot merge tokens across the prompt/completion boundary.

Only the standard library is used, and all randomness comes from one ``random.Random(seed)``, so running
``python scripts/make_demo_data.py`` always rewrites byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SEED = 20240611
"""Seed of the single ``random.Random`` used for all generated data."""

N_BASE_PER_TASK = 40
"""Number of base (training) rows generated per task."""

COT_SUFFIX = " Please output the reason first and then the final answer, regardless of the above description."
"""Text appended to a Z prompt to obtain the matching Z'' (chain-of-thought) prompt."""

DATA_DIR = Path(__file__).resolve().parents[1] / "swift_callbacks" / "assets" / "data"
"""Directory holding the bundled JSONL files."""

FILE_NAMES = ("base", "cot_study_z", "cot_study_z_similar", "cot_study_z_cot")
"""Stems of the bundled JSONL files, in the order :func:`build_all` returns them."""

# Short everyday words (3 to 8 letters) used by the word tasks.
WORDS = (
    "apple", "bread", "chair", "dog", "eagle", "forest", "garden", "house", "island", "jacket",
    "kettle", "lemon", "mango", "night", "orange", "pencil", "queen", "river", "stone", "tiger",
    "umbrella", "violin", "window", "yellow", "zebra", "anchor", "basket", "candle", "dragon", "engine",
    "flower", "guitar", "hammer", "insect", "jungle", "kitten", "ladder", "magnet", "needle", "oyster",
    "parrot", "rabbit", "saddle", "tomato", "velvet", "walnut", "cat", "sun", "map", "cup",
    "hat", "pen", "box", "fox", "bee", "owl", "ant", "egg", "ink", "jar",
    "key", "log", "mud", "nut", "oak", "pig", "rug", "sea", "toy", "van",
    "wax", "yak", "bird", "cake", "desk", "fish", "gold", "hill", "iron", "kite",
    "lamp", "milk", "nest", "park", "rain", "salt", "tree", "wind", "ship", "frog",
    "cloud", "grape", "horse", "music", "ocean", "plant", "sugar", "train", "whale", "camel",
)  # fmt: skip

# A small fixed table of countries and their capital cities.
CAPITALS = (
    ("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Germany", "Berlin"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Canada", "Ottawa"), ("Russia", "Moscow"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"), ("Hungary", "Budapest"), ("Cuba", "Havana"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Turkey", "Ankara"), ("Ghana", "Accra"), ("Nigeria", "Abuja"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Nepal", "Kathmandu"), ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"), ("Ecuador", "Quito"), ("Belgium", "Brussels"), ("Switzerland", "Bern"),
    ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
    ("Iceland", "Reykjavik"), ("Australia", "Canberra"), ("Indonesia", "Jakarta"), ("Morocco", "Rabat"),
    ("Senegal", "Dakar"), ("Uganda", "Kampala"), ("Qatar", "Doha"), ("Jordan", "Amman"),
    ("Latvia", "Riga"), ("Estonia", "Tallinn"), ("Albania", "Tirana"), ("Armenia", "Yerevan"),
)  # fmt: skip

_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
)  # fmt: skip
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def number_to_words(n: int) -> str:
    """Spells out an integer in English words.

    Args:
        n: Integer in ``[0, 99]``.

    Returns:
        The English spelling, e.g. ``"forty-seven"`` for 47.

    Raises:
        ValueError: If ``n`` is outside ``[0, 99]``.
    """
    if not 0 <= n <= 99:
        raise ValueError(f"number_to_words supports 0..99, got {n}")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] if ones == 0 else f"{_TENS[tens]}-{_ONES[ones]}"


@dataclass(frozen=True)
class Item:
    """One generated question with its short answer and a one-sentence reason.

    Attributes:
        question: The plain prompt text (no trailing whitespace).
        answer: The short final answer.
        reason: A short explanation used by the chain-of-thought completion.
    """

    question: str
    answer: str
    reason: str


def _add(rng: random.Random) -> Item:
    a, b = rng.randint(0, 50), rng.randint(0, 49)
    return Item(f"What is {a} plus {b}?", str(a + b), f"{a} plus {b} makes {a + b}.")


def _subtract(rng: random.Random) -> Item:
    a = rng.randint(10, 99)
    b = rng.randint(0, a)
    return Item(f"What is {a} minus {b}?", str(a - b), f"Taking {b} away from {a} leaves {a - b}.")


def _compare(rng: random.Random) -> Item:
    a, b = rng.sample(range(100), 2)
    big, small = max(a, b), min(a, b)
    return Item(f"Which is larger, {a} or {b}?", str(big), f"{big} is more than {small}.")


def _reverse(rng: random.Random) -> Item:
    w = rng.choice(WORDS)
    r = w[::-1]
    return Item(f"Reverse the letters of {w}.", r, f"Reading {'-'.join(w)} from the end gives {'-'.join(r)}.")


def _sort_digits(rng: random.Random) -> Item:
    digits = rng.sample(range(10), rng.randint(3, 5))
    shown = " ".join(map(str, digits))
    ordered = " ".join(map(str, sorted(digits)))
    return Item(
        f"Sort the digits {shown} from smallest to largest.",
        ordered,
        f"Putting {shown} in increasing order gives {ordered}.",
    )


def _count_letters(rng: random.Random) -> Item:
    w = rng.choice(WORDS)
    reason = f"Spelled out, {'-'.join(w)} has {len(w)} letters."
    return Item(f"How many letters does {w} have?", str(len(w)), reason)


def _next_letter(rng: random.Random) -> Item:
    i = rng.randrange(25)
    cur, nxt = _LETTERS[i], _LETTERS[i + 1]
    if rng.random() < 0.5:
        cur, nxt = cur.upper(), nxt.upper()
    reason = f"In the alphabet, {nxt} follows {cur}."
    return Item(f"Which letter comes after {cur} in the alphabet?", nxt, reason)


def _capital(rng: random.Random) -> Item:
    country, city = rng.choice(CAPITALS)
    return Item(f"What is the capital of {country}?", city, f"The capital city of {country} is {city}.")


def _uppercase(rng: random.Random) -> Item:
    w = rng.choice(WORDS)
    reason = f"Turning each letter of {w} into a capital gives {w.upper()}."
    return Item(f"Write {w} in uppercase.", w.upper(), reason)


def _parity(rng: random.Random) -> Item:
    n = rng.randint(0, 999)
    last = n % 10
    kind = "even" if n % 2 == 0 else "odd"
    return Item(f"Is {n} even or odd?", kind, f"{n} ends in {last}, which is {kind}.")


def _number_word(rng: random.Random) -> Item:
    n = rng.randint(0, 99)
    word = number_to_words(n)
    return Item(f"Write {n} in words.", word, f"The number {n} is spelled {word}.")


def _last_letter(rng: random.Random) -> Item:
    w = rng.choice(WORDS)
    return Item(f"What is the last letter of {w}?", w[-1], f"The word {w} ends with {w[-1]}.")


GENERATORS: dict[str, Callable[[random.Random], Item]] = {
    "add": _add,
    "subtract": _subtract,
    "compare": _compare,
    "reverse": _reverse,
    "sort_digits": _sort_digits,
    "count_letters": _count_letters,
    "next_letter": _next_letter,
    "capital": _capital,
    "uppercase": _uppercase,
    "parity": _parity,
    "number_word": _number_word,
    "last_letter": _last_letter,
}
"""Task name -> function drawing one random :class:`Item` of that task."""

TASKS: list[str] = list(GENERATORS)
"""Task names, in the order used by every bundled file."""


def plain_row(row_id: str, task: str, item: Item) -> dict[str, str]:
    """Builds a plain (non-CoT) prompt-completion row.

    Args:
        row_id: Identifier of the row, unique within its file.
        task: Task name.
        item: The generated question.

    Returns:
        A row with keys ``id``, ``task``, ``prompt``, ``completion`` and ``answer``.
    """
    return {
        "id": row_id,
        "task": task,
        "prompt": item.question,
        "completion": f" {item.answer}",
        "answer": item.answer,
    }


def cot_row(row_id: str, task: str, item: Item) -> dict[str, str]:
    """Builds the chain-of-thought row for a question.

    The prompt is the plain prompt followed by :data:`COT_SUFFIX`; the completion gives the reason first and
    ends with ``"So the answer is <answer>."``.

    Args:
        row_id: Identifier of the row, unique within its file.
        task: Task name.
        item: The generated question.

    Returns:
        A row with keys ``id``, ``task``, ``prompt``, ``completion`` and ``answer``.
    """
    return {
        "id": row_id,
        "task": task,
        "prompt": item.question + COT_SUFFIX,
        "completion": f" {item.reason} So the answer is {item.answer}.",
        "answer": item.answer,
    }


def _draw_new(rng: random.Random, task: str, taken: set[str]) -> Item:
    """Draws items of ``task`` until one has a question not in ``taken``, then records it."""
    for _ in range(10_000):
        item = GENERATORS[task](rng)
        if item.question not in taken:
            taken.add(item.question)
            return item
    raise RuntimeError(f"could not draw a new question for task {task!r}")


def build_all(seed: int = SEED, n_base_per_task: int = N_BASE_PER_TASK) -> dict[str, list[dict[str, str]]]:
    """Generates every bundled data set.

    The Z and Z' questions are drawn first; the base set then avoids them, so neither the Z nor the Z' prompt
    occurs in the base set. For the capital task the held-out countries therefore never appear in base.

    Args:
        seed: Seed of the ``random.Random`` used for all draws.
        n_base_per_task: Number of base rows per task.

    Returns:
        Mapping from file stem (see :data:`FILE_NAMES`) to its rows.
    """
    rng = random.Random(seed)
    z_items: dict[str, Item] = {}
    z_similar_items: dict[str, Item] = {}
    held_out: dict[str, set[str]] = {}
    for task in TASKS:
        taken: set[str] = set()
        z_items[task] = _draw_new(rng, task, taken)
        z_similar_items[task] = _draw_new(rng, task, taken)
        held_out[task] = taken

    base: list[dict[str, str]] = []
    for task in TASKS:
        taken = set(held_out[task])
        for i in range(n_base_per_task):
            base.append(plain_row(f"{task}-{i:04d}", task, _draw_new(rng, task, taken)))
    rng.shuffle(base)

    return {
        "base": base,
        "cot_study_z": [plain_row(f"{t}-z", t, z_items[t]) for t in TASKS],
        "cot_study_z_similar": [plain_row(f"{t}-zsim", t, z_similar_items[t]) for t in TASKS],
        "cot_study_z_cot": [cot_row(f"{t}-zcot", t, z_items[t]) for t in TASKS],
    }


def base_rows(seed: int = SEED) -> list[dict[str, str]]:
    """Returns the rows of ``base.jsonl``.

    Args:
        seed: Generator seed.

    Returns:
        The base instruction-tuning rows.
    """
    return build_all(seed)["base"]


def cot_study_rows(seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    """Returns the CoT study probe/eval sets Z, Z' and Z''.

    Args:
        seed: Generator seed.

    Returns:
        Mapping with keys ``cot_study_z``, ``cot_study_z_similar`` and ``cot_study_z_cot``.
    """
    data = build_all(seed)
    return {name: data[name] for name in FILE_NAMES if name != "base"}


def to_jsonl(rows: list[dict[str, str]]) -> str:
    """Serializes rows to JSONL text exactly as stored in the bundled files.

    Args:
        rows: Rows to serialize.

    Returns:
        One JSON object per line, with a trailing newline.
    """
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_all(out_dir: str | Path = DATA_DIR, seed: int = SEED) -> dict[str, Path]:
    """Generates and (re)writes every bundled JSONL file.

    Args:
        out_dir: Directory to write into (created if missing).
        seed: Generator seed.

    Returns:
        Mapping from file stem to the written path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, rows in build_all(seed).items():
        path = out / f"{name}.jsonl"
        path.write_text(to_jsonl(rows), encoding="utf-8")
        written[name] = path
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: regenerates the bundled data files.

    Args:
        argv: Command-line arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Process exit status.
    """
    parser = argparse.ArgumentParser(description="Regenerate the swift-study demo JSONL files.")
    parser.add_argument("--out-dir", default=str(DATA_DIR), help="output directory (default: the data dir)")
    parser.add_argument("--seed", type=int, default=SEED, help="generator seed")
    args = parser.parse_args(argv)
    for name, path in write_all(args.out_dir, args.seed).items():
        n = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"wrote {n:4d} rows to {path} ({name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
