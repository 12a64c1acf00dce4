"""`map` transform: sets and removes fields of JSON values, headers, the key and the event time.

    python -m etlrouter.connectors.map --port 50062 \
        --program 'value.total = value.amount * 2; headers.country = upper(value.country); del value.secret'

The stage option `program` overrides --program per pipeline. Output records map one-to-one to inputs;
a record the program cannot be applied to is a per-record PERMANENT error.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import click

from etlrouter.connectors._common import VERSION, invoke, serve_service, server_options
from etlrouter.connectors.expr import EvaluationError, ExpressionError, compile_program
from etlrouter.sdk import Capabilities, ErrorClass, OptionsError, Processed, Record, RecordError, Transform

# Stage options arrive with every batch; compile each distinct text once, not per batch.
_cached_program = functools.lru_cache(maxsize=64)(compile_program)


class MapTransform(Transform):
    # Not declared one_to_one: a record that fails is left out of the output (it is reported by index).
    capabilities = Capabilities(name="map", version=VERSION, labels={"format": "json"})

    def __init__(self, program: str | None = None) -> None:
        if program is not None:
            compile_program(program)
        self.default_program = program

    async def process(self, records: list[Record], options: Mapping[str, str]) -> Processed:
        source = options.get("program", self.default_program)
        if not source:
            raise OptionsError("no map program: set the stage option 'program' or start with --program")
        try:
            apply = _cached_program(source)
        except ExpressionError as exc:
            raise OptionsError(f"options.program: {exc}") from None
        output: list[Record] = []
        errors: list[RecordError] = []
        for index, record in enumerate(records):
            try:
                output.append(apply(record))
            except EvaluationError as exc:
                errors.append(RecordError(index, ErrorClass.PERMANENT, f"map: {exc}"))
        return Processed(output, errors)


@click.command(name="map")
@click.option("--program", help="Default map program (a stage's 'program' option overrides it).")
@server_options
def cli(program: str | None, host: str, port: int, log_level: str, log_format: str) -> None:
    """Rewrite records with a small assignment program."""
    try:
        service = MapTransform(program)
    except ExpressionError as exc:
        raise click.BadParameter(str(exc), param_hint="--program") from None
    serve_service(service, host=host, port=port, log_level=log_level, log_format=log_format)


def main(args: Sequence[str] | None = None) -> None:
    invoke(cli, args, "etlrouter.connectors.map")


if __name__ == "__main__":
    main()
