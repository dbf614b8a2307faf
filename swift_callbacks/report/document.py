"""A tiny report document model rendered to Markdown or to one self-contained HTML file.

The report is a flat list of blocks (headings, paragraphs, bullet lists, tables, images). Both renderers are
written here so that tables need no optional dependency (``tabulate``) and the HTML embeds its images as base64
data URIs with inline CSS: the file opens anywhere, offline, with nothing next to it.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: Sequence[str]


@dataclass(frozen=True)
class Table:
    """A table of already formatted cells (``str`` or numbers, formatted by ``format_cell``)."""

    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""


@dataclass(frozen=True)
class Image:
    """A PNG written beside the Markdown file; ``alt`` doubles as the caption."""

    path: Path
    alt: str


Block = Union[Heading, Paragraph, Bullets, Table, Image]  # noqa: UP007 (a runtime alias, py3.10 safe)


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)


def format_cell(value: Any) -> str:
    """Floats to 4 significant digits, booleans to yes/no, NaN / None to an en dash, anything else to ``str``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---- Markdown ------------------------------------------------------------------------------------------------


def to_markdown(doc: Document) -> str:
    """Render ``doc`` as GitHub-flavoured Markdown (images referenced by file name, relative to the .md)."""
    parts = [f"# {doc.title}"]
    for block in doc.blocks:
        parts.append(_md_block(block))
    return "\n\n".join(parts) + "\n"


def _md_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}"
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Bullets):
        return "\n".join(f"- {item}" for item in block.items)
    if isinstance(block, Table):
        return markdown_table(block)
    if isinstance(block, Image):
        return f"![{block.alt}]({block.path.name})"
    raise TypeError(f"Unknown report block {block!r}")


def markdown_table(table: Table) -> str:
    """A pipe table; ``|`` inside cells is escaped so a label never splits a row."""

    def cell(v: Any) -> str:
        return format_cell(v).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(c) for c in table.columns) + " |",
        "|" + "|".join("---" for _ in table.columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.rows]
    if table.caption:
        lines = [f"*{table.caption}*", "", *lines]
    return "\n".join(lines)


# ---- HTML ----------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1150px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: 0.3em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def to_html(doc: Document) -> str:
    """Render ``doc`` as one HTML file: inline CSS, images as ``data:image/png;base64`` URIs, no external link."""
    body = "\n".join(_html_block(b) for b in doc.blocks)
    title = html.escape(doc.title)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<h1>{title}</h1>\n{body}\n</body>\n</html>\n"
    )


def _html_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{_inline(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>\n" + "\n".join(f"<li>{_inline(i)}</li>" for i in block.items) + "\n</ul>"
    if isinstance(block, Table):
        return html_table(block)
    if isinstance(block, Image):
        data = base64.b64encode(block.path.read_bytes()).decode("ascii")
        alt = html.escape(block.alt, quote=True)
        return (
            f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(block.alt)}</figcaption></figure>"
        )
    raise TypeError(f"Unknown report block {block!r}")


def html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(format_cell(c))}</th>" for c in table.columns)
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(format_cell(v))}</td>" for v in row) + "</tr>" for row in table.rows
    )
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    return f"<table>{caption}\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody></table>"


def _inline(text: str) -> str:
    """Escape text, then turn the two Markdown spans the report uses (``code`` and **bold**) into tags."""
    out, code, bold = [], False, False
    for i, piece in enumerate(html.escape(text).split("`")):
        if i:
            code = not code
        if code:
            out.append(f"<code>{piece}</code>")
            continue
        chunks = piece.split("**")
        for j, chunk in enumerate(chunks):
            if j:
                bold = not bold
                out.append("<strong>" if bold else "</strong>")
            out.append(chunk)
    if bold:
        out.append("</strong>")
    return "".join(out)
