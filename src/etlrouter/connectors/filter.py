"""`filter` transform: keeps the records for which an expression is true.

    python -m etlrouter.connectors.filter --port 50061 --expr 'value.amount > 10 and headers.country == "DE"'

The stage option `expr` overrides --expr per pipeline. A record whose expression cannot be evaluated (its
value is not JSON, types do not compare) is a per-record PERMANENT error (to the dead-letter queue).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import click

from etlrouter.connectors._common import VERSION, invoke, serve_service, server_options
from etlrouter.connectors.expr import EvaluationError, ExpressionError, compile_predicate
from etlrouter.sdk import Capabilities, ErrorClass, OptionsError, Processed, Record, RecordError, Transform

# Stage options arrive with every batch; compile each distinct text once, not per batch.
_cached_predicate = functools.lru_cache(maxsize=64)(compile_predicate)


class FilterTransform(Transform):
    capabilities = Capabilities(name="filter", version=VERSION, labels={"format": "json"})

    def __init__(self, expr: str | None = None) -> None:
        if expr is not None:
            compile_predicate(expr)  # fail at start-up, not on the first batch
        self.default_expr = expr

    async def process(self, records: list[Record], options: Mapping[str, str]) -> Processed:
        source = options.get("expr", self.default_expr)
        if not source:
            raise OptionsError("no filter expression: set the stage option 'expr' or start with --expr")
        try:
            keep = _cached_predicate(source)
        except ExpressionError as exc:
            raise OptionsError(f"options.expr: {exc}") from None
        kept: list[int] = []
        errors: list[RecordError] = []
        for index, record in enumerate(records):
            try:
                if keep(record):
                    kept.append(index)
            except EvaluationError as exc:
                errors.append(RecordError(index, ErrorClass.PERMANENT, f"filter: {exc}"))
        # By index: the kept records go on exactly as they came, copied rather than encoded again.
        return Processed(errors=errors, kept=kept)


@click.command(name="filter")
@click.option("--expr", help="Default filter expression (a stage's 'expr' option overrides it).")
@server_options
def cli(expr: str | None, host: str, port: int, log_level: str, log_format: str) -> None:
    """Keep the records for which EXPR is true."""
    try:
        service = FilterTransform(expr)
    except ExpressionError as exc:
        raise click.BadParameter(str(exc), param_hint="--expr") from None
    serve_service(service, host=host, port=port, log_level=log_level, log_format=log_format)


def main(args: Sequence[str] | None = None) -> None:
    invoke(cli, args, "etlrouter.connectors.filter")


if __name__ == "__main__":
    main()
