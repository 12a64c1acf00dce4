"""The click commands `etlrouter conformance` and `etlrouter verify` (registered in etlrouter.cli)."""

from __future__ import annotations

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
    import asyncio  # imported late, like the rest: keeps `etlrouter --help` fast

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


def _seconds(text: str) -> float:
    """`60`, `60s`, `2m`, `500ms` -> seconds."""
    from etlrouter.dsl.options import ValueProblem, parse_duration_ms

    try:
        return float(text) if text.replace(".", "", 1).isdigit() else parse_duration_ms(text) / 1000
    except ValueProblem as e:
        raise click.BadParameter(f"{text!r}: {e}") from None


@click.command(
    name="verify",
    help="The delivery oracle: run a local cluster (as `etlrouter dev` does), an oracle source fanned out "
    "to three branches (direct, filter, map with failing records), optionally kill -9 sidecars, services and "
    "the Raft leader on a schedule (--chaos), and judge at the end: every acknowledged record in every "
    "branch, intact, duplicates counted, the DLQ accounted for. Exit 0 only when nothing was lost.",
)
@click.option("--duration", default="60s", show_default=True, help="How long records flow (and chaos runs).")
@click.option("--rate", type=click.FloatRange(min=1), default=500.0, show_default=True, help="Records/s.")
@click.option("--partitions", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--seed", type=int, default=19, show_default=True, help="Oracle records and chaos schedule.")
@click.option("--chaos", is_flag=True, help="Kill -9 a sidecar, a service or the Raft leader on a schedule.")
@click.option("--chaos-interval", default="5s", show_default=True, help="Time between faults.")
@click.option("--down", default="1s", show_default=True, help="How long a killed process stays down.")
@click.option("--filter", "filter_expr", help="The filter branch's expression (reference filter).")
@click.option("--map", "map_program", help="The map branch's program (reference map).")
@click.option("--routers", type=click.IntRange(1, 7), default=3, show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=".data/verify", show_default=True)
@click.option(
    "--base-port", type=click.IntRange(0, 65535), default=0, show_default=True, help="0 = free ports."
)
@click.option(
    "--drain-timeout", default="120s", show_default=True, help="After --duration, for the last acks."
)
@click.option(
    "--transform-command",
    help="Your own transform as a fourth branch: the command that serves it, with {port} where it must "
    "listen (it must keep each record's offset and the value's JSON `partition` field).",
)
@click.option(
    "--report", "report_file", type=click.Path(dir_okay=False), help="JSON report (default DATA/verify.json)."
)
def verify(
    duration: str,
    rate: float,
    partitions: int,
    seed: int,
    chaos: bool,
    chaos_interval: str,
    down: str,
    filter_expr: str | None,
    map_program: str | None,
    routers: int,
    data_dir: str,
    base_port: int,
    drain_timeout: str,
    transform_command: str | None,
    report_file: str | None,
) -> None:
    if transform_command is not None and "{port}" not in transform_command:
        raise click.BadParameter(
            "the command must say where to listen: {port}", param_hint="--transform-command"
        )
    from etlrouter.conformance.verify import DEFAULT_FILTER, DEFAULT_PROGRAM, VerifyOptions, run_verify

    options = VerifyOptions(
        data_dir=Path(data_dir),
        duration_s=_seconds(duration),
        rate=rate,
        partitions=partitions,
        seed=seed,
        chaos=chaos,
        chaos_interval_s=_seconds(chaos_interval),
        down_s=_seconds(down),
        filter_expr=filter_expr or DEFAULT_FILTER,
        map_program=map_program or DEFAULT_PROGRAM,
        routers=routers,
        base_port=base_port,
        drain_timeout_s=_seconds(drain_timeout),
        report_file=Path(report_file) if report_file else None,
        transform_command=transform_command,
    )
    sys.exit(run_verify(options))
