"""Diagnostics for the pipeline DSL.

Every problem the lexer, parser or checker finds is a `DslError` that knows where it happened
(file, line, column), shows the offending source line with a caret under the spot, and may carry a
hint such as "did you mean `enrich-users`?". Several errors travel together as `DslErrors`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import msgspec


class SourcePos(msgspec.Struct, frozen=True, array_like=True):
    """A 1-based line and column (in characters) inside one source file; JSON `[line, col]`."""

    line: int
    col: int


class DslError(Exception):
    """One diagnostic, anchored at file:line:col."""

    def __init__(
        self,
        message: str,
        *,
        filename: str,
        line: int,
        col: int,
        source_line: str = "",
        hint: str | None = None,
        length: int = 1,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.filename = filename
        self.line = line
        self.col = col
        self.source_line = source_line
        self.hint = hint
        self.length = max(1, length)

    @property
    def location(self) -> str:
        return f"{self.filename}:{self.line}:{self.col}"

    def render(self) -> str:
        """The message as a compiler would print it: location, source line, caret, hint."""
        lines = [f"{self.location}: error: {self.message}"]
        if self.source_line:
            gutter = f"{self.line:>4} | "
            # Tabs would shift the caret; show them as single spaces so the caret lines up.
            shown = self.source_line.replace("\t", " ")
            caret_width = min(self.length, max(1, len(shown) - self.col + 1))
            lines.append(gutter + shown)
            lines.append(" " * (len(gutter) + self.col - 1) + "^" * caret_width)
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()

    def __repr__(self) -> str:
        return f"DslError({self.location}: {self.message!r})"

    def sort_key(self) -> tuple[str, int, int, str]:
        return (self.filename, self.line, self.col, self.message)


class DslErrors(Exception):
    """All the errors found in one run, in source order. Raised by `compile` and friends."""

    def __init__(self, errors: Sequence[DslError]) -> None:
        self.errors: list[DslError] = sorted(errors, key=DslError.sort_key)
        count = len(self.errors)
        super().__init__(f"{count} error{'s' if count != 1 else ''} in pipeline definitions")

    def __str__(self) -> str:
        return "\n\n".join(error.render() for error in self.errors)


class Source:
    """The text of one file, with fast access to its lines for error rendering."""

    def __init__(self, text: str, filename: str) -> None:
        self.text = text
        self.filename = filename
        self.lines = text.split("\n")

    def line_text(self, line: int) -> str:
        if 1 <= line <= len(self.lines):
            return self.lines[line - 1].rstrip("\r")
        return ""

    def error(self, message: str, pos: SourcePos, *, hint: str | None = None, length: int = 1) -> DslError:
        return DslError(
            message,
            filename=self.filename,
            line=pos.line,
            col=pos.col,
            source_line=self.line_text(pos.line),
            hint=hint,
            length=length,
        )


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """A hint naming the closest candidate(s) to a misspelled word, or None if nothing is close."""
    pool = sorted(set(candidates))
    matches = difflib.get_close_matches(word, pool, n=2, cutoff=0.6)
    if not matches:
        return None
    if len(matches) == 1:
        return f"did you mean `{matches[0]}`?"
    return f"did you mean `{matches[0]}` or `{matches[1]}`?"
