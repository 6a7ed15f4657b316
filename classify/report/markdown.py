"""Names as literal text in the report's Markdown: ``md`` escapes a value, ``code_span`` fences one,
``markdown_table`` lays out a table of them; ``Markdown`` marks text that is markup already."""

from __future__ import annotations

import re

import pandas as pd


class Markdown(str):
    """Text that is Markdown already (a bold number), put into the report as it is."""


# What Markdown (GitHub's, with tables, strikethrough and math) would read as markup: backslash,
# code, emphasis, links, table cells, strikethrough, math; an underscore only where it can emphasise.
_MARKUP = re.compile(r"[\\`*\[\]|~$]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def md(value) -> str:
    """``value`` (a class, split, layer or file name) as literal text in Markdown and in the HTML it
    renders to: whitespace runs (a newline would end a table row) become one space, ``&`` and ``<``
    become entities (no tag, no live HTML; ``>`` alone starts none), and Markdown's markup characters
    are backslash-escaped."""
    if isinstance(value, Markdown):
        return value
    text = " ".join(str(value).split()).replace("&", "&amp;").replace("<", "&lt;")
    return _MARKUP.sub(lambda match: "\\" + match.group(0), text)


def code_span(value) -> str:
    """``value`` as a code span, whatever backticks it holds (CommonMark: a longer fence)."""
    text = " ".join(str(value).split())
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-Markdown table; every header and cell is text (``md``) unless it is ``Markdown``."""
    header = "| " + " | ".join(md(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(frame[c].infer_objects()) else "---" for c in frame.columns) + "|"
    body = ["| " + " | ".join(md(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])
