"""A small, safe expression language over records, for the `filter` and `map` connectors.

No Python `eval`: a lexer and a recursive-descent parser build a tree that is compiled into nested
closures (fast to run once per record). Grammar and semantics are documented in docs/sdk.md.

    value.amount > 10 and headers.country == "DE"
    value.total = value.amount * 2; headers.tier = "gold"; del value.secret

Errors name the column (1-based) of the offending token.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import msgspec

from etlrouter.sdk import Record


class ExpressionError(ValueError):
    """A parse error (or an evaluation error) at a column of the expression."""

    def __init__(self, message: str, column: int, source: str) -> None:
        super().__init__(f"column {column}: {message} (in {source!r})")
        self.reason = message
        self.column = column
        self.source = source


class EvaluationError(ValueError):
    """A record cannot be evaluated (e.g. its value is not JSON, or types do not compare)."""


# ---------------------------------------------------------------------------------------------- lexer

_KEYWORDS = {"and", "or", "not", "in", "true", "false", "null", "del"}
_TWO_CHAR_OPS = {"==", "!=", "<=", ">="}
_ONE_CHAR_OPS = set("<>+-*/%()[].,=;")
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}


class Token(msgspec.Struct, frozen=True):
    kind: str  # "number" | "string" | "name" | "keyword" | "op" | "end"
    text: str
    column: int
    value: Any = None


def tokenize(source: str) -> list[Token]:
    tokens: list[Token] = []
    i, n = 0, len(source)
    while i < n:
        ch = source[i]
        column = i + 1
        if ch.isspace():
            i += 1
        elif ch.isdigit():
            j = i
            while j < n and (source[j].isdigit() or source[j] == "."):
                j += 1
            text = source[i:j]
            try:
                number: int | float = float(text) if "." in text else int(text)
            except ValueError:
                raise ExpressionError(f"malformed number {text!r}", column, source) from None
            tokens.append(Token("number", text, column, number))
            i = j
        elif ch in "\"'":
            j, chars = i + 1, []
            while True:
                if j >= n:
                    raise ExpressionError("unterminated string", column, source)
                c = source[j]
                if c == ch:
                    break
                if c == "\\":
                    if j + 1 >= n or source[j + 1] not in _ESCAPES:
                        raise ExpressionError("unknown escape in string", j + 1, source)
                    chars.append(_ESCAPES[source[j + 1]])
                    j += 2
                else:
                    chars.append(c)
                    j += 1
            tokens.append(Token("string", source[i : j + 1], column, "".join(chars)))
            i = j + 1
        elif ch.isalpha() or ch == "_":
            j = i
            while j < n and (source[j].isalnum() or source[j] == "_"):
                j += 1
            word = source[i:j]
            tokens.append(Token("keyword" if word in _KEYWORDS else "name", word, column))
            i = j
        elif source[i : i + 2] in _TWO_CHAR_OPS:
            tokens.append(Token("op", source[i : i + 2], column))
            i += 2
        elif ch in _ONE_CHAR_OPS:
            tokens.append(Token("op", ch, column))
            i += 1
        else:
            raise ExpressionError(f"unexpected character {ch!r}", column, source)
    tokens.append(Token("end", "", n + 1))
    return tokens


# ------------------------------------------------------------------------------- record evaluation context


class RecordContext:
    """The record an expression reads (and a map program writes). The value is decoded from JSON on first
    use and re-encoded only if a program changed it."""

    __slots__ = ("_value", "_value_bytes", "event_time_ms", "headers", "key", "offset", "value_changed")

    _MISSING: Any = object()

    def __init__(self, record: Record) -> None:
        self._value_bytes = record.value
        self._value: Any = RecordContext._MISSING
        self.value_changed = False
        self.key: bytes = record.key
        self.headers = record.headers
        self.event_time_ms = record.event_time_ms
        self.offset = record.offset

    @property
    def value(self) -> Any:
        if self._value is RecordContext._MISSING:
            try:
                self._value = _json_decode(self._value_bytes)
            except msgspec.DecodeError as exc:
                raise EvaluationError(f"value is not valid JSON: {exc}") from None
        return self._value

    def set_value(self, value: Any) -> None:
        self._value = value
        self.value_changed = True

    def key_text(self) -> str:
        try:
            return self.key.decode()
        except UnicodeDecodeError:
            raise EvaluationError("key is not valid UTF-8") from None

    def to_record(self) -> Record:
        value = _json_encode(self._value) if self.value_changed else self._value_bytes
        return Record(self.key, value, self.headers, self.event_time_ms, self.offset)


_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode

Compiled = Callable[[RecordContext], Any]

# ------------------------------------------------------------------------------------- value semantics


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _type_name(x: Any) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "boolean"
    if _is_number(x):
        return "number"
    if isinstance(x, str):
        return "string"
    if isinstance(x, list):
        return "list"
    return "object"


def _equal(a: Any, b: Any) -> bool:
    # JSON semantics: true is not 1.
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return bool(a == b)


def _ordered(op: str, column: int) -> Callable[[Any, Any], bool]:
    compare: Callable[[Any, Any], bool] = {
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b,
    }[op]

    def ordered(a: Any, b: Any) -> bool:
        if a is None or b is None:
            return False  # a missing field satisfies no ordering (like SQL NULL)
        if (_is_number(a) and _is_number(b)) or (isinstance(a, str) and isinstance(b, str)):
            return compare(a, b)
        raise EvaluationError(f"column {column}: cannot compare {_type_name(a)} {op} {_type_name(b)}")

    return ordered


def _arithmetic(op: str, column: int) -> Callable[[Any, Any], Any]:
    def arithmetic(a: Any, b: Any) -> Any:
        if op == "+" and isinstance(a, str) and isinstance(b, str):
            return a + b
        if not (_is_number(a) and _is_number(b)):
            raise EvaluationError(
                f"column {column}: cannot apply {op} to {_type_name(a)} and {_type_name(b)}"
            )
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if b == 0:
            raise EvaluationError(f"column {column}: division by zero")
        if op == "/":
            return a / b
        return a % b

    return arithmetic


def _contains(container: Any, item: Any, column: int) -> bool:
    if container is None:
        return False
    if isinstance(container, str):
        if not isinstance(item, str):
            raise EvaluationError(f"column {column}: cannot look for {_type_name(item)} in a string")
        return item in container
    if isinstance(container, list):
        return any(_equal(item, x) for x in container)
    if isinstance(container, dict):
        return item in container
    raise EvaluationError(
        f"column {column}: 'in' needs a list, string or object, not {_type_name(container)}"
    )


def _access(container: Any, key: Any) -> Any:
    # Lenient: reading through something that is not a container yields null.
    if isinstance(container, dict):
        return container.get(key) if isinstance(key, str) else None
    if isinstance(container, list) and isinstance(key, int) and not isinstance(key, bool):
        return container[key] if -len(container) <= key < len(container) else None
    if isinstance(container, str) and isinstance(key, int) and not isinstance(key, bool):
        return container[key] if -len(container) <= key < len(container) else None
    return None


def _to_str(x: Any) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return _json_encode(x).decode()


def _to_number(x: Any) -> Any:
    if _is_number(x) or x is None:
        return x
    if isinstance(x, str):
        try:
            return int(x)
        except ValueError:
            try:
                return float(x)
            except ValueError:
                raise EvaluationError(f"{x!r} is not a number") from None
    raise EvaluationError(f"cannot convert {_type_name(x)} to a number")


def _len(x: Any) -> int:
    if isinstance(x, str | list | dict):
        return len(x)
    if x is None:
        return 0
    raise EvaluationError(f"len() of {_type_name(x)}")


def _text_fn(name: str, fn: Callable[[str], Any]) -> Callable[[Any], Any]:
    def apply(x: Any) -> Any:
        if x is None:
            return None
        if not isinstance(x, str):
            raise EvaluationError(f"{name}() needs a string, not {_type_name(x)}")
        return fn(x)

    return apply


def _text_pred(name: str, fn: Callable[[str, str], bool]) -> Callable[[Any, Any], Any]:
    def apply(x: Any, y: Any) -> Any:
        if x is None or y is None:
            return False
        if not (isinstance(x, str) and isinstance(y, str)):
            raise EvaluationError(f"{name}() needs two strings, not {_type_name(x)} and {_type_name(y)}")
        return fn(x, y)

    return apply


# name -> (arity, implementation)
FUNCTIONS: dict[str, tuple[int, Callable[..., Any]]] = {
    "len": (1, _len),
    "lower": (1, _text_fn("lower", str.lower)),
    "upper": (1, _text_fn("upper", str.upper)),
    "trim": (1, _text_fn("trim", str.strip)),
    "str": (1, lambda x: None if x is None else _to_str(x)),
    "number": (1, _to_number),
    "exists": (1, lambda x: x is not None),
    "startswith": (2, _text_pred("startswith", str.startswith)),
    "endswith": (2, _text_pred("endswith", str.endswith)),
    "contains": (2, _text_pred("contains", lambda a, b: b in a)),
}

ROOTS = ("value", "key", "headers", "event_time_ms", "offset")

# ------------------------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.tokens = tokenize(source)
        self.pos = 0

    # -- helpers
    @property
    def tok(self) -> Token:
        return self.tokens[self.pos]

    def error(self, message: str, token: Token | None = None) -> ExpressionError:
        return ExpressionError(message, (token or self.tok).column, self.source)

    def describe(self, token: Token) -> str:
        return "end of input" if token.kind == "end" else repr(token.text)

    def accept(self, text: str) -> Token | None:
        tok = self.tok
        if tok.kind in ("op", "keyword") and tok.text == text:
            self.pos += 1
            return tok
        return None

    def expect(self, text: str, what: str) -> Token:
        tok = self.accept(text)
        if tok is None:
            raise self.error(f"expected {what}, found {self.describe(self.tok)}")
        return tok

    def expect_end(self) -> None:
        if self.tok.kind != "end":
            raise self.error(f"unexpected {self.describe(self.tok)} after a complete expression")

    # -- expressions
    def expression(self) -> Compiled:
        return self.or_expr()

    def or_expr(self) -> Compiled:
        left = self.and_expr()
        while self.accept("or"):
            right = self.and_expr()
            left = (lambda a, b: lambda c: bool(a(c)) or bool(b(c)))(left, right)
        return left

    def and_expr(self) -> Compiled:
        left = self.not_expr()
        while self.accept("and"):
            right = self.not_expr()
            left = (lambda a, b: lambda c: bool(a(c)) and bool(b(c)))(left, right)
        return left

    def not_expr(self) -> Compiled:
        if self.accept("not"):
            operand = self.not_expr()
            return lambda c: not operand(c)
        return self.comparison()

    def comparison(self) -> Compiled:
        left = self.additive()
        tok = self.tok
        if tok.kind == "op" and tok.text in ("==", "!=", "<", "<=", ">", ">="):
            self.pos += 1
            right = self.operand_after(tok, self.additive)
            if tok.text == "==":
                return lambda c: _equal(left(c), right(c))
            if tok.text == "!=":
                return lambda c: not _equal(left(c), right(c))
            ordered = _ordered(tok.text, tok.column)
            return lambda c: ordered(left(c), right(c))
        negated = False
        if tok.kind == "keyword" and tok.text == "not" and self.tokens[self.pos + 1].text == "in":
            self.pos += 1
            negated = True
            tok = self.tok
        if tok.kind == "keyword" and tok.text == "in":
            self.pos += 1
            right = self.operand_after(tok, self.additive)
            column = tok.column
            if negated:
                return lambda c: not _contains(right(c), left(c), column)
            return lambda c: _contains(right(c), left(c), column)
        return left

    def operand_after(self, operator: Token, parse: Callable[[], Compiled]) -> Compiled:
        if self.tok.kind == "end":
            raise self.error(f"expected a value after {operator.text!r}, found end of input")
        return parse()

    def additive(self) -> Compiled:
        left = self.multiplicative()
        while self.tok.kind == "op" and self.tok.text in ("+", "-"):
            tok = self.tok
            self.pos += 1
            right = self.operand_after(tok, self.multiplicative)
            left = (lambda f, a, b: lambda c: f(a(c), b(c)))(_arithmetic(tok.text, tok.column), left, right)
        return left

    def multiplicative(self) -> Compiled:
        left = self.unary()
        while self.tok.kind == "op" and self.tok.text in ("*", "/", "%"):
            tok = self.tok
            self.pos += 1
            right = self.operand_after(tok, self.unary)
            left = (lambda f, a, b: lambda c: f(a(c), b(c)))(_arithmetic(tok.text, tok.column), left, right)
        return left

    def unary(self) -> Compiled:
        tok = self.accept("-")
        if tok is not None:
            operand = self.operand_after(tok, self.unary)
            negate = _arithmetic("-", tok.column)
            return lambda c: negate(0, operand(c))
        return self.postfix(self.primary())

    def postfix(self, base: Compiled) -> Compiled:
        while True:
            if self.accept("."):
                name = self.tok
                if name.kind not in ("name", "keyword"):
                    raise self.error(f"expected a field name after '.', found {self.describe(name)}")
                self.pos += 1
                base = (lambda b, k: lambda c: _access(b(c), k))(base, name.text)
            elif self.accept("["):
                index = self.expression()
                self.expect("]", "']'")
                base = (lambda b, i: lambda c: _access(b(c), i(c)))(base, index)
            else:
                return base

    def primary(self) -> Compiled:
        tok = self.tok
        if tok.kind in ("number", "string"):
            self.pos += 1
            constant = tok.value
            return lambda c: constant
        if tok.kind == "keyword" and tok.text in ("true", "false", "null"):
            self.pos += 1
            literal = {"true": True, "false": False, "null": None}[tok.text]
            return lambda c: literal
        if self.accept("("):
            inner = self.expression()
            self.expect(")", "')'")
            return inner
        if self.accept("["):
            items: list[Compiled] = []
            if not self.accept("]"):
                items.append(self.expression())
                while self.accept(","):
                    items.append(self.expression())
                self.expect("]", "',' or ']'")
            return lambda c: [item(c) for item in items]
        if tok.kind == "name":
            self.pos += 1
            if self.tok.kind == "op" and self.tok.text == "(":
                return self.call(tok)
            return self.root(tok)
        raise self.error(f"expected a value, found {self.describe(tok)}")

    def root(self, tok: Token) -> Compiled:
        name = tok.text
        if name == "value":
            return lambda c: c.value
        if name == "key":
            return lambda c: c.key_text()
        if name == "headers":
            return lambda c: c.headers
        if name == "event_time_ms":
            return lambda c: c.event_time_ms
        if name == "offset":
            return lambda c: c.offset
        hint = f" (did you mean value.{name}?)"
        raise self.error(f"unknown name {name!r}: use one of {', '.join(ROOTS)}{hint}", tok)

    def call(self, name: Token) -> Compiled:
        if name.text not in FUNCTIONS:
            raise self.error(
                f"unknown function {name.text!r}: known are {', '.join(sorted(FUNCTIONS))}", name
            )
        arity, fn = FUNCTIONS[name.text]
        self.expect("(", "'('")
        args: list[Compiled] = []
        if not self.accept(")"):
            args.append(self.expression())
            while self.accept(","):
                args.append(self.expression())
            self.expect(")", "',' or ')'")
        if len(args) != arity:
            raise self.error(f"{name.text}() takes {arity} argument(s), got {len(args)}", name)
        column = name.column
        label = name.text

        def invoke(c: RecordContext) -> Any:
            try:
                return fn(*[a(c) for a in args])
            except EvaluationError as exc:
                if str(exc).startswith("column "):
                    raise
                raise EvaluationError(f"column {column}: {exc}") from None
            except (TypeError, ValueError) as exc:
                raise EvaluationError(f"column {column}: {label}(): {exc}") from None

        return invoke

    # -- map programs
    def program(self) -> list[Callable[[RecordContext], None]]:
        statements = [self.statement()]
        while self.accept(";"):
            if self.tok.kind == "end":
                break
            statements.append(self.statement())
        self.expect_end()
        return statements

    def statement(self) -> Callable[[RecordContext], None]:
        if self.accept("del"):
            return self.target(deleting=True)
        return self.target(deleting=False)

    def target(self, *, deleting: bool) -> Callable[[RecordContext], None]:
        tok = self.tok
        if tok.kind != "name" or tok.text not in ("value", "headers", "key", "event_time_ms"):
            raise self.error(
                "expected a target (value..., headers.NAME, key or event_time_ms), "
                f"found {self.describe(tok)}"
            )
        self.pos += 1
        path: list[Compiled] = []
        while True:
            if self.accept("."):
                name = self.tok
                if name.kind not in ("name", "keyword"):
                    raise self.error(f"expected a field name after '.', found {self.describe(name)}")
                self.pos += 1
                path.append((lambda k: lambda c: k)(name.text))
            elif self.accept("["):
                path.append(self.expression())
                self.expect("]", "']'")
            else:
                break
        if tok.text in ("key", "event_time_ms") and path:
            raise self.error(f"{tok.text} has no fields", tok)
        if tok.text == "headers" and len(path) != 1:
            raise self.error("a header target is headers.NAME", tok)
        if deleting:
            if tok.text in ("key", "event_time_ms") or (tok.text == "value" and not path):
                raise self.error(f"cannot delete {tok.text}; assign it instead", tok)
            return _deleter(tok.text, path)
        self.expect("=", "'=' after the target")
        expression = self.operand_after(self.tokens[self.pos - 1], self.expression)
        return _assigner(tok.text, path, expression, tok.column)


def _deleter(root: str, path: list[Compiled]) -> Callable[[RecordContext], None]:
    if root == "headers":
        name = path[0]

        def delete_header(c: RecordContext) -> None:
            header = name(c)
            if header in c.headers:
                c.headers = {k: v for k, v in c.headers.items() if k != header}

        return delete_header

    def delete_field(c: RecordContext) -> None:
        parent = c.value
        for step in path[:-1]:
            parent = _access(parent, step(c))
        last = path[-1](c)
        in_object = isinstance(parent, dict) and isinstance(last, str) and last in parent
        in_list = isinstance(parent, list) and _is_number(last) and -len(parent) <= int(last) < len(parent)
        if in_object or in_list:
            del parent[last]
            c.value_changed = True

    return delete_field


def _assigner(
    root: str, path: list[Compiled], expression: Compiled, column: int
) -> Callable[[RecordContext], None]:
    if root == "key":

        def set_key(c: RecordContext) -> None:
            new = expression(c)
            c.key = b"" if new is None else _to_str(new).encode()

        return set_key
    if root == "event_time_ms":

        def set_time(c: RecordContext) -> None:
            new = expression(c)
            if not _is_number(new):
                raise EvaluationError(f"column {column}: event_time_ms needs a number, got {_type_name(new)}")
            c.event_time_ms = int(new)

        return set_time
    if root == "headers":
        name = path[0]

        def set_header(c: RecordContext) -> None:
            header, new = name(c), expression(c)
            if not isinstance(header, str):
                raise EvaluationError(f"column {column}: a header name must be a string")
            headers = {k: v for k, v in c.headers.items() if k != header}
            if new is not None:  # assigning null removes the header
                headers[header] = _to_str(new)
            c.headers = headers

        return set_header

    def set_field(c: RecordContext) -> None:
        new = expression(c)
        if not path:
            c.set_value(new)
            return
        parent = c.value
        if not isinstance(parent, dict | list):
            raise EvaluationError(f"column {column}: value is {_type_name(parent)}, not an object")
        for step in path[:-1]:
            key = step(c)
            child = _access(parent, key)
            if child is None and isinstance(parent, dict) and isinstance(key, str):
                child = parent[key] = {}
            if not isinstance(child, dict | list):
                raise EvaluationError(f"column {column}: cannot set a field inside {_type_name(child)}")
            parent = child
        last = path[-1](c)
        if isinstance(parent, dict) and isinstance(last, str):
            parent[last] = new
        elif isinstance(parent, list) and _is_number(last) and -len(parent) <= int(last) < len(parent):
            parent[int(last)] = new
        else:
            raise EvaluationError(f"column {column}: cannot set {last!r} on {_type_name(parent)}")
        c.value_changed = True

    return set_field


# ------------------------------------------------------------------------------------------ public API


@functools.lru_cache(maxsize=256)
def compile_predicate(source: str) -> Callable[[Record], bool]:
    """Compile a filter expression; the result says whether a record passes. Raises ExpressionError."""
    if not source.strip():
        raise ExpressionError("empty expression", 1, source)
    parser = _Parser(source)
    expression = parser.expression()
    parser.expect_end()

    def predicate(record: Record) -> bool:
        return bool(expression(RecordContext(record)))

    return predicate


@functools.lru_cache(maxsize=256)
def compile_evaluator(source: str) -> Callable[[Record], Any]:
    """Compile an expression to a function returning its (JSON) value for a record."""
    if not source.strip():
        raise ExpressionError("empty expression", 1, source)
    parser = _Parser(source)
    expression = parser.expression()
    parser.expect_end()
    return lambda record: expression(RecordContext(record))


@functools.lru_cache(maxsize=256)
def compile_program(source: str) -> Callable[[Record], Record]:
    """Compile a map program (`target = expr; del target; ...`) into a record -> record function."""
    if not source.strip():
        raise ExpressionError("empty program", 1, source)
    statements = _Parser(source).program()

    def apply(record: Record) -> Record:
        context = RecordContext(record)
        if statements and context.headers is record.headers:
            context.headers = dict(record.headers)  # never mutate the caller's dict
        for statement in statements:
            statement(context)
        return context.to_record()

    return apply
