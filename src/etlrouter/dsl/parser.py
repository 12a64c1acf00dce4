"""Hand-written recursive-descent parser for the pipeline DSL (grammar in docs/dsl.md).

Errors never escape as anything but `DslError`s: the parser records one error per broken pipeline,
skips to the next `pipeline` keyword and carries on, so a file with three typos reports three errors.
Nesting (tees inside tees, calls inside calls) is capped so hostile input cannot exhaust the stack.
"""

from __future__ import annotations

from collections.abc import Set

from etlrouter.dsl.errors import Diagnostics, DslErrors, ErrorSink, Source, capped, did_you_mean
from etlrouter.dsl.lexer import Token, TokenKind, tokenize
from etlrouter.dsl.syntax import (
    STAGE_KINDS,
    Chain,
    Document,
    Option,
    Pipeline,
    Stage,
    StageKind,
    Step,
    Tee,
    Value,
)

MAX_NESTING = 16
KEYWORDS = ("pipeline", "tee", "true", "false", *STAGE_KINDS)
_STEP_WORDS = (*STAGE_KINDS, "tee")
_KIND_BY_WORD: dict[str, StageKind] = {kind: kind for kind in STAGE_KINDS}
# Known here only to word hints; the checker owns what settings mean.
PIPELINE_SETTINGS = ("on_branch_lag",)


class _Abort(Exception):
    """Unwinds the parse of one pipeline after its first error has been recorded."""


def parse(text: str, filename: str = "<input>") -> Document:
    """Parse `text`; raise `DslErrors` listing every syntax error found."""
    document, errors = parse_with_errors(text, filename)
    if errors:
        raise DslErrors(errors)
    return document


def parse_with_errors(text: str, filename: str = "<input>") -> tuple[Document, Diagnostics]:
    """Parse `text`, returning the pipelines that parsed cleanly and all errors found."""
    source = Source(text, filename)
    tokens, lex_errors = tokenize(source)
    # A bad character usually derails the parser on the same line; report the cause, not the echo.
    parser = _Parser(source, tokens, quiet_lines=lex_errors.lines)
    pipelines = parser.document()
    errors = capped(lex_errors, parser.errors)
    return Document(filename=filename, pipelines=tuple(pipelines), text=text), errors


def _describe(token: Token) -> str:
    if token.kind is TokenKind.EOF:
        return "end of file"
    if token.kind is TokenKind.STRING:
        return f'string "{token.text}"'
    if token.kind is TokenKind.NAME and token.text in KEYWORDS:
        return f"keyword `{token.text}`"
    return f"`{token.text}`"


class _Parser:
    def __init__(self, source: Source, tokens: list[Token], quiet_lines: Set[int] = frozenset()) -> None:
        self.source = source
        self.tokens = tokens
        self.index = 0
        self.errors = ErrorSink(source)
        self.quiet_lines = quiet_lines  # lines whose errors are echoes of a lexical error there

    # -- token plumbing -------------------------------------------------------------------------

    def peek(self, ahead: int = 0) -> Token:
        # `index` never passes the final EOF token, so only look-ahead needs a bound.
        if ahead:
            return self.tokens[min(self.index + ahead, len(self.tokens) - 1)]
        return self.tokens[self.index]

    def advance(self) -> Token:
        token = self.tokens[self.index]
        if token.kind is not TokenKind.EOF:
            self.index += 1
        return token

    def at_word(self, word: str) -> bool:
        token = self.peek()
        return token.kind is TokenKind.NAME and token.text == word

    def fail(self, message: str, token: Token, hint: str | None = None) -> _Abort:
        if token.pos.line not in self.quiet_lines:
            self.errors.report(message, token.pos, hint=hint, length=token.length)
        return _Abort()

    def expect(self, kind: TokenKind, what: str) -> Token:
        token = self.peek()
        if token.kind is not kind:
            raise self.fail(f"expected {what}, found {_describe(token)}", token)
        return self.advance()

    def expect_name(self, what: str) -> Token:
        token = self.peek()
        if token.kind is not TokenKind.NAME:
            hint = None
            if token.kind is TokenKind.STRING:
                hint = "names are written without quotes"
            raise self.fail(f"expected {what}, found {_describe(token)}", token, hint)
        if token.text in KEYWORDS:
            raise self.fail(
                f"expected {what}, found {_describe(token)}",
                token,
                f"`{token.text}` is a reserved word and cannot be used as a name",
            )
        return self.advance()

    def skip_to_next_pipeline(self) -> None:
        # A plain loop over the list: garbage files send the parser here with a million tokens to skip.
        tokens, index, last = self.tokens, self.index, len(self.tokens) - 1  # tokens[last] is EOF
        name = TokenKind.NAME
        while index < last and not (tokens[index].kind is name and tokens[index].text == "pipeline"):
            index += 1
        self.index = index

    # -- grammar ---------------------------------------------------------------------------------

    def document(self) -> list[Pipeline]:
        pipelines: list[Pipeline] = []
        while self.peek().kind is not TokenKind.EOF:
            start = self.index
            try:
                pipelines.append(self.pipeline())
            except _Abort:
                if self.index == start:
                    self.advance()  # guarantee progress when the very first token was wrong
                self.skip_to_next_pipeline()
        return pipelines

    def pipeline(self) -> Pipeline:
        keyword = self.peek()
        if not self.at_word("pipeline"):
            hint = None
            if keyword.kind is TokenKind.NAME:
                hint = did_you_mean(keyword.text, ["pipeline"])
            if hint is None and keyword.kind is TokenKind.NAME and keyword.text in _STEP_WORDS:
                hint = "stages live inside `pipeline NAME { ... }`"
            raise self.fail(f"expected `pipeline`, found {_describe(keyword)}", keyword, hint)
        self.advance()
        name = self.expect_name("a pipeline name")
        self.expect(TokenKind.LBRACE, "`{` to open the pipeline body")
        chain = self.chain(depth=0)
        settings: list[Option] = []
        while self.peek().kind is TokenKind.NAME and self.peek(1).kind is TokenKind.EQUALS:
            settings.append(self.option(depth=0))
        closing = self.peek()
        if closing.kind is not TokenKind.RBRACE:
            raise self.unexpected_after_chain(closing, in_tee=False)
        self.advance()
        return Pipeline(
            name=name.text, chain=chain, settings=tuple(settings), pos=keyword.pos, name_pos=name.pos
        )

    def unexpected_after_chain(self, token: Token, *, in_tee: bool) -> _Abort:
        closer = "`}` to close the tee" if in_tee else "a setting or `}`"
        if token.kind is TokenKind.NAME and token.text in _STEP_WORDS and not in_tee:
            return self.fail(
                f"expected `|` before `{token.text}`",
                token,
                "stages of a pipeline are joined with `|`",
            )
        hint = None
        if token.kind is TokenKind.NAME:
            hint = did_you_mean(token.text, _STEP_WORDS)
            if not in_tee and token.text in PIPELINE_SETTINGS:
                hint = f"settings are written `{token.text} = value`"
        return self.fail(f"expected `|`, {closer}, found {_describe(token)}", token, hint)

    def chain(self, depth: int) -> Chain:
        first = self.peek()
        steps: list[Step] = [self.step(depth)]
        while self.peek().kind is TokenKind.PIPE:
            pipe = self.advance()
            if isinstance(steps[-1], Tee):
                raise self.fail(
                    "nothing may follow a tee",
                    pipe,
                    "continue each branch inside the tee's braces instead",
                )
            steps.append(self.step(depth))
        return Chain(steps=tuple(steps), pos=first.pos)

    def step(self, depth: int) -> Step:
        token = self.peek()
        if token.kind is TokenKind.NAME and token.text in STAGE_KINDS:
            return self.stage()
        if self.at_word("tee"):
            return self.tee(depth)
        hint = None
        if token.kind is TokenKind.NAME:
            hint = did_you_mean(token.text, _STEP_WORDS)
            if self.peek(1).kind is TokenKind.EQUALS:
                hint = f"settings such as `{token.text} = ...` go after the stages, just before `}}`"
            elif hint is None and token.text not in KEYWORDS:
                hint = f"write the kind before the service, e.g. `transform {token.text}`"
        raise self.fail(
            f"expected a stage (source, transform, lookup, sink or tee), found {_describe(token)}",
            token,
            hint,
        )

    def stage(self) -> Stage:
        kind_token = self.advance()
        kind = _KIND_BY_WORD[kind_token.text]
        service = self.expect_name(f"a service name after `{kind}`")
        options: tuple[Option, ...] = ()
        if self.peek().kind is TokenKind.LPAREN:
            options = self.options(depth=0)
        return Stage(
            kind=kind, service=service.text, options=options, pos=kind_token.pos, service_pos=service.pos
        )

    def tee(self, depth: int) -> Tee:
        keyword = self.advance()
        if depth >= MAX_NESTING:
            raise self.fail(f"tees nested more than {MAX_NESTING} deep", keyword)
        self.expect(TokenKind.LBRACE, "`{` after `tee`")
        branches: list[Chain] = []
        while True:
            while self.peek().kind is TokenKind.SEMI:
                self.advance()
            token = self.peek()
            if token.kind is TokenKind.RBRACE:
                break
            if token.kind is TokenKind.NAME and token.text in _STEP_WORDS:
                branches.append(self.chain(depth + 1))
                continue
            if branches:
                raise self.unexpected_after_chain(token, in_tee=True)
            branches.append(self.chain(depth + 1))  # reports "expected a stage ..."
        closing = self.advance()
        if not branches:
            raise self.fail("a tee needs at least one branch", closing, "e.g. `tee { sink a; sink b }`")
        return Tee(branches=tuple(branches), pos=keyword.pos)

    def options(self, depth: int) -> tuple[Option, ...]:
        self.advance()  # `(`
        options: list[Option] = []
        while self.peek().kind is not TokenKind.RPAREN:
            options.append(self.option(depth))
            if self.peek().kind is TokenKind.COMMA:
                self.advance()
                continue
            if self.peek().kind is not TokenKind.RPAREN:
                token = self.peek()
                hint = "separate options with `,`" if token.kind is TokenKind.NAME else None
                raise self.fail(f"expected `,` or `)`, found {_describe(token)}", token, hint)
        self.advance()  # `)`
        return tuple(options)

    def option(self, depth: int) -> Option:
        name = self.peek()
        if name.kind is not TokenKind.NAME:
            raise self.fail(f"expected an option name, found {_describe(name)}", name)
        self.advance()
        equals = self.peek()
        if equals.kind is not TokenKind.EQUALS:
            raise self.fail(
                f"expected `=` after `{name.text}`, found {_describe(equals)}",
                equals,
                f"options are written `{name.text} = value`",
            )
        self.advance()
        return Option(name=name.text, value=self.value(depth), pos=name.pos)

    def value(self, depth: int) -> Value:
        low = self.scalar_or_call(depth)
        if self.peek().kind is not TokenKind.RANGE:
            return low
        self.advance()
        high = self.scalar_or_call(depth)
        if low.kind in ("call", "range") or high.kind in ("call", "range"):
            raise self.fail("the ends of a range must be plain values like `100ms`", self.peek())
        return Value(kind="range", text=f"{low.text}..{high.text}", pos=low.pos, low=low, high=high)

    def scalar_or_call(self, depth: int) -> Value:
        token = self.peek()
        kind = token.kind
        if kind is TokenKind.STRING:
            self.advance()
            return Value(kind="string", text=token.text, pos=token.pos)
        if kind is TokenKind.INT:
            self.advance()
            return Value(kind="int", text=token.text, pos=token.pos)
        if kind is TokenKind.FLOAT:
            self.advance()
            return Value(kind="float", text=token.text, pos=token.pos)
        if kind is TokenKind.UNIT:
            self.advance()
            return Value(kind="unit", text=token.text, pos=token.pos)
        if kind is TokenKind.NAME:
            self.advance()
            if token.text in ("true", "false"):
                return Value(kind="bool", text=token.text, pos=token.pos)
            if self.peek().kind is not TokenKind.LPAREN:
                return Value(kind="name", text=token.text, pos=token.pos)
            if depth >= MAX_NESTING:
                raise self.fail(f"values nested more than {MAX_NESTING} deep", token)
            args = self.options(depth + 1)
            return Value(kind="call", text=token.text, pos=token.pos, args=args)
        raise self.fail(f"expected a value, found {_describe(token)}", token)
