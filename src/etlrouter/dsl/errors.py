"""Diagnostics for the pipeline DSL.

Every problem the lexer, parser or checker finds is a `DslError` that knows where it happened
(file, line, column), shows the offending source line with a caret under the spot, and may carry a
hint such as "did you mean `enrich-users`?". Several errors travel together as `DslErrors`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

# A file with thousands of problems is usually not a pipeline file at all: report the first ones, count
# the rest. Also keeps `ctl validate` output and the admin API's answers small.
MAX_ERRORS = 100
# Source lines longer than this are shown as a window around the column (a minified or binary file would
# otherwise print its whole length once per error).
EXCERPT_WIDTH = 100
ELLIPSIS = "…"


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
            shown, col = excerpt(self.source_line, self.col)
            caret_width = min(self.length, max(1, len(shown) - col + 1))
            lines.append(gutter + shown)
            lines.append(" " * (len(gutter) + col - 1) + "^" * caret_width)
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()

    def __repr__(self) -> str:
        return f"DslError({self.location}: {self.message!r})"

    def sort_key(self) -> tuple[str, int, int, str]:
        return (self.filename, self.line, self.col, self.message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments: the default Exception pickling would call DslError(message) and fail.
        # Pickled when a router's worker process (core/offload.py) sends diagnostics back.
        return (
            _rebuild_error,
            (self.message, self.filename, self.line, self.col, self.source_line, self.hint, self.length),
        )


def _rebuild_error(
    message: str, filename: str, line: int, col: int, source_line: str, hint: str | None, length: int
) -> DslError:
    return DslError(
        message, filename=filename, line=line, col=col, source_line=source_line, hint=hint, length=length
    )


def excerpt(line: str, col: int, width: int = EXCERPT_WIDTH) -> tuple[str, int]:
    """The part of `line` to show for column `col` (1-based), and the column within it.

    Tabs become single spaces so the caret lines up. A line longer than `width` is cut to a window that
    starts a little before the column, marked with an ellipsis on each side that was cut.
    """
    if len(line) <= width:
        return line.replace("\t", " "), col
    start = max(0, min(col - 1 - width // 4, len(line) - width))
    window = line[start : start + width].replace("\t", " ")
    prefix = ELLIPSIS if start > 0 else ""
    suffix = ELLIPSIS if start + width < len(line) else ""
    return prefix + window + suffix, col - start + len(prefix)


class Diagnostics(list[DslError]):
    """The first MAX_ERRORS errors in source order, and how many more were found but left out."""

    def __init__(self, errors: Iterable[DslError] = (), omitted: int = 0) -> None:
        super().__init__(errors)
        self.omitted = omitted

    def more_line(self) -> str:
        """ "… and N more errors", or "" when nothing was left out."""
        if not self.omitted:
            return ""
        return f"{ELLIPSIS} and {self.omitted} more error{'s' if self.omitted != 1 else ''}"


class ErrorSink(Diagnostics):
    """Collects a producer's errors (lexer, parser) in the order it finds them, and past `limit` only
    counts them: building a DslError (and its excerpt) for the 100,000th error of a garbage file would
    be most of the work. `lines` has every line with an error, kept or not."""

    def __init__(self, source: Source, limit: int = MAX_ERRORS) -> None:
        super().__init__()
        self.source = source
        self.limit = limit
        self.lines: set[int] = set()

    def report(self, message: str, pos: SourcePos, *, hint: str | None = None, length: int = 1) -> None:
        self.lines.add(pos.line)
        if len(self) < self.limit:
            self.append(self.source.error(message, pos, hint=hint, length=length))
        else:
            self.omitted += 1


def capped(*groups: Iterable[DslError], limit: int = MAX_ERRORS) -> Diagnostics:
    """Merge groups of errors into source order and keep the first `limit`; the errors a group had
    already left out (a `Diagnostics`) count among the omitted."""
    ordered = sorted((error for group in groups for error in group), key=DslError.sort_key)
    earlier = sum(getattr(group, "omitted", 0) for group in groups)
    return Diagnostics(ordered[:limit], max(0, len(ordered) - limit) + earlier)


class DslErrors(Exception):
    """All the errors found in one run (at most MAX_ERRORS, with a count of the rest), in source order.
    Raised by `compile` and friends."""

    def __init__(self, errors: Sequence[DslError]) -> None:
        self.errors: Diagnostics = capped(errors)
        count = len(self.errors) + self.errors.omitted
        super().__init__(f"{count} error{'s' if count != 1 else ''} in pipeline definitions")

    def __reduce__(self) -> tuple[Any, ...]:
        return (DslErrors, (self.errors,))  # a Diagnostics: the omitted count goes along

    def __str__(self) -> str:
        rendered = [error.render() for error in self.errors]
        if self.errors.omitted:
            rendered.append(self.errors.more_line())
        return "\n\n".join(rendered)


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
