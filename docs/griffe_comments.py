"""A griffe extension for the API reference: an attribute without a docstring is documented by its comments.

The typed configs (`salsa.config`) and module constants document each field with a comment on its line, or with a
block of comment lines right above it; this makes that text the attribute's docstring, so the reference shows it.
"""

from __future__ import annotations

import io
import re
import tokenize

import griffe

# comments for tools, not readers
TOOL_COMMENT = re.compile(r"^(fmt:|noqa|type:|pragma|ruff:|isort:)")
RULE = re.compile(r"^[-=#*\s]*$")


def _trailing_comment(line: str) -> str:
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return ""
    comments = [t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT]
    return comments[-1] if comments else ""


def _comment_above(lines: list[str], first: int) -> str:
    block: list[str] = []
    i = first - 2  # the line above the attribute's first line (lines are 1-based)
    while i >= 0 and lines[i].strip().startswith("#"):
        text = lines[i].strip().lstrip("#").strip()
        if RULE.match(text):
            break
        block.insert(0, text)
        i -= 1
    return " ".join(block)


class CommentDocstrings(griffe.Extension):
    def on_attribute_instance(self, *, node, attr: griffe.Attribute, agent, **kwargs) -> None:
        if attr.docstring is not None or attr.lineno is None:
            return
        try:
            lines = attr.lines_collection[attr.filepath]
        except (KeyError, TypeError):
            return
        last = attr.endlineno or attr.lineno
        trailing = _trailing_comment(lines[last - 1])
        if TOOL_COMMENT.match(trailing):
            trailing = ""
        text = " ".join(t for t in (_comment_above(lines, attr.lineno), trailing) if t)
        if text:
            attr.docstring = griffe.Docstring(text, lineno=attr.lineno, endlineno=last, parent=attr)
