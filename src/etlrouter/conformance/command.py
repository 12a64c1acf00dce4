"""The click commands `etlrouter conformance` and `etlrouter verify` (registered in etlrouter.cli)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import click

KIND_CHOICES = ("source", "transform", "sink", "lookup")


def _option_pairs(values: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r}: expected KEY=VALUE", param_hint="--option")
        out[key] = text
    return out


@click.command(
    name="conformance",
    help="Check that the user service at ADDRESS (HOST:PORT, any language) keeps the contract of the kinds "
    "it serves, found by gRPC reflection. One line per check; exit 0 only when every required check passes. "
    "It pulls and acknowledges a source's records and writes test batches to a sink: use a test instance.",
)
@click.argument("address")
@click.option("--junit", "junit_file", type=click.Path(dir_okay=False), help="Also write JUnit XML here.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds a pipeline stage gives one call (the stage option `timeout`).",
)
@click.option(
    "--slack",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="Seconds a long poll or a call after cancellations may answer late.",
)
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice(KIND_CHOICES),
    help="Check this kind even if reflection does not list it (repeat).",
)
@click.option(
    "--option", "stage_options", multiple=True, metavar="KEY=VALUE", help="A stage option (repeat)."
)
@click.option(
    "--records",
    "records_file",
    type=click.Path(exists=True, dir_okay=False),
    help="JSON-lines records for transforms and sinks (the jsonl-file sink's format); default: sample JSON.",
)
@click.option("--key", "keys", multiple=True, help="A lookup key that exists (repeat).")
@click.option(
    "--verify-command",
    help="Shell command printing how many records of batch {batch_id} the sink holds (also in "
    "$ETLROUTER_BATCH_ID), e.g. \"grep -c '{batch_id}' out.jsonl\".",
)
def conformance(
    address: str,
    junit_file: str | None,
    timeout: float,
    slack: float,
    kinds: Sequence[str],
    stage_options: Sequence[str],
    records_file: str | None,
    keys: Sequence[str],
    verify_command: str | None,
) -> None:
    from etlrouter.conformance.checks import Options
    from etlrouter.conformance.model import format_report, junit_xml
    from etlrouter.conformance.runner import run_conformance

    records = None
    if records_file is not None:
        from etlrouter.connectors.jsonl_file_source import parse_record_line

        lines = Path(records_file).read_bytes().splitlines()
        records = [parse_record_line(line, n) for n, line in enumerate(lines, start=1) if line.strip()]
    options = Options(
        timeout_s=timeout,
        slack_s=slack,
        kinds=tuple(kinds),
        stage_options=_option_pairs(stage_options),
        records=records,
        keys=[k.encode() for k in keys],
        verify_command=verify_command,
    )
    report = asyncio.run(run_conformance(address, options))
    for line in format_report(report):
        click.echo(line)
    if junit_file:
        Path(junit_file).write_bytes(junit_xml(report))
    sys.exit(report.exit_code)
