"""Tokenizer for the pipeline DSL.

Newlines are insignificant (the grammar never needs them), `#` starts a comment that runs to the end
of the line. Names may contain `-` and `.` (`kafka-orders`, `config.bucket`) because service names in
a cluster usually do. A number directly followed by letters is a unit literal: `100ms`, `1MiB`.
The lexer never raises: bad characters become errors and lexing carries on, so one typo does not
hide the rest of the file.
"""

from __future__ import annotations

import enum
import re

import msgspec

from etlrouter.dsl.errors import ErrorSink, Source, SourcePos


class TokenKind(enum.Enum):
    NAME = "name"
    STRING = "string"
    INT = "int"
    FLOAT = "float"
    UNIT = "unit"  # a number with a unit suffix: a duration or a size
    LBRACE = "{"
    RBRACE = "}"
    LPAREN = "("
    RPAREN = ")"
    COMMA = ","
    SEMI = ";"
    EQUALS = "="
    PIPE = "|"
    RANGE = ".."
    EOF = "end of file"


class Token(msgspec.Struct, frozen=True):
    kind: TokenKind
    text: str  # the raw source text (for STRING: the decoded value)
    pos: SourcePos
    length: int


_PUNCT = {
    "{": TokenKind.LBRACE,
    "}": TokenKind.RBRACE,
    "(": TokenKind.LPAREN,
    ")": TokenKind.RPAREN,
    ",": TokenKind.COMMA,
    ";": TokenKind.SEMI,
    "=": TokenKind.EQUALS,
    "|": TokenKind.PIPE,
}
_DIGITS = frozenset("0123456789")
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}

# One alternation scanned with `match` at each offset: the regex engine does the per-character work.
_TOKEN = re.compile(
    r"""
      (?P<space>[ \t\r\f\v]+)
    | (?P<newline>\n)
    | (?P<comment>\#[^\n]*)
    | (?P<range>\.\.)
    | (?P<name>[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z_][A-Za-z0-9_-]*)*)
    | (?P<number>-?[0-9])
    | (?P<string>")
    | (?P<punct>[{}(),;=|])
    | (?P<bad>(?:[^ \t\r\f\v\n\#.A-Za-z_0-9"{}(),;=|-]|\.(?!\.)|-(?![0-9]))+)
    """,
    re.VERBOSE,
)


def tokenize(source: Source) -> tuple[list[Token], ErrorSink]:
    """Split `source` into tokens (always ending with EOF) and the lexical errors found on the way (the
    first MAX_ERRORS, and a count of the rest)."""
    text = source.text
    tokens: list[Token] = []
    errors = ErrorSink(source)
    index = 0
    line = 1
    line_start = 0
    end = len(text)
    match_token = _TOKEN.match
    while index < end:
        match = match_token(text, index)
        # `bad` takes any character no token starts with, so every offset matches.
        assert match is not None
        group = match.lastgroup
        if group == "space":
            index = match.end()
            continue
        pos = SourcePos(line, index - line_start + 1)
        if group == "bad":
            # A run of such characters is reported once; the regex finds the whole run (a Python loop
            # re-trying the token regex at each offset of the run made pathological files slow).
            bad = match.group()
            shown = repr(bad) if not bad.isprintable() else f"`{bad}`"
            noun = "character" if len(bad) == 1 else "characters"
            errors.report(f"unexpected {noun} {shown}", pos, length=len(bad))
            index = match.end()
            continue
        if group == "newline":
            line += 1
            line_start = index = match.end()
        elif group == "comment":
            index = match.end()
        elif group == "name":
            index = match.end()
            tokens.append(Token(TokenKind.NAME, match.group(), pos, index - match.start()))
        elif group == "punct":
            tokens.append(Token(_PUNCT[match.group()], match.group(), pos, 1))
            index += 1
        elif group == "range":
            tokens.append(Token(TokenKind.RANGE, "..", pos, 2))
            index += 2
        elif group == "number":
            index = _lex_number(text, index, pos, tokens, errors, source)
        else:  # string
            index = _lex_string(text, index, pos, tokens, errors, source)
    tokens.append(Token(TokenKind.EOF, "", SourcePos(line, end - line_start + 1), 1))
    return tokens, errors


def _lex_number(
    text: str, start: int, pos: SourcePos, tokens: list[Token], errors: ErrorSink, source: Source
) -> int:
    end = len(text)
    index = start + 1
    while index < end and (text[index] in _DIGITS or text[index] == "_"):
        index += 1
    kind = TokenKind.INT
    # `1.5` is a float; `1..5` is a range, so a dot only continues the number before a digit.
    if index + 1 < end and text[index] == "." and text[index + 1] in _DIGITS:
        kind = TokenKind.FLOAT
        index += 1
        while index < end and (text[index] in _DIGITS or text[index] == "_"):
            index += 1
    number_end = index
    while index < end and text[index].isascii() and text[index].isalpha():
        index += 1
    raw = text[start:index]
    if index > number_end:
        kind = TokenKind.UNIT
    digits = text[start:number_end]
    try:
        float(digits) if kind is not TokenKind.INT else int(digits)
    except ValueError:
        errors.report(f"malformed number `{raw}`", pos, length=len(raw))
        return index
    tokens.append(Token(kind, raw, pos, index - start))
    return index


def _lex_string(
    text: str, start: int, pos: SourcePos, tokens: list[Token], errors: ErrorSink, source: Source
) -> int:
    end = len(text)
    index = start + 1
    chars: list[str] = []
    while index < end:
        char = text[index]
        if char == '"':
            tokens.append(Token(TokenKind.STRING, "".join(chars), pos, index + 1 - start))
            return index + 1
        if char == "\n":
            break
        if char == "\\":
            escaped = text[index + 1] if index + 1 < end else ""
            if escaped in _ESCAPES and escaped:
                chars.append(_ESCAPES[escaped])
                index += 2
                continue
            column = pos.col + (index - start)
            errors.report(
                f"unknown escape `\\{escaped}` in string",
                SourcePos(pos.line, column),
                hint='allowed escapes are \\" \\\\ \\n \\t',
                length=2,
            )
            index += 2 if escaped and escaped != "\n" else 1
            continue
        chars.append(char)
        index += 1
    errors.report("unterminated string", pos, hint='close it with `"` on the same line', length=index - start)
    return index
