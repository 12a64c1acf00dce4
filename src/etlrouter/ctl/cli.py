"""`etlrouter ctl`: manage pipelines and inspect the router cluster.

Exit codes: 0 ok, 1 runtime error, 2 invalid input (bad DSL, bad flags), 3 cannot reach the cluster.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

from etlrouter.cli_context import Context
from etlrouter.core.config import ConfigError
from etlrouter.ctl.output import render
from etlrouter.dsl import EXPLAIN_FORMATS, DslErrors, explain_file, validate_file

EXIT_OK, EXIT_RUNTIME, EXIT_INVALID, EXIT_UNREACHABLE = 0, 1, 2, 3


def die(message: str, code: int) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(code)


def read_pipeline_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        die(f"cannot read {path}: {e.strerror}", EXIT_INVALID)
    except UnicodeDecodeError as e:
        die(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})", EXIT_INVALID)


@click.group(help="Manage pipelines and inspect the router cluster.")
@click.option(
    "--router", "router_address", metavar="HOST:PORT", help="Router address (also ETLROUTER_CTL__ROUTER)."
)
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), help="Output format.")
@click.pass_obj
def ctl(obj: Context, router_address: str | None, output: str | None) -> None:
    overrides = {k: v for k, v in {"router": router_address, "output": output}.items() if v is not None}
    obj.ctl_overrides = overrides


@ctl.command(
    help="Check a pipeline file offline: syntax, options, kinds. Prints every problem with file:line:col."
)
@click.argument("file", type=click.Path(dir_okay=False))
@click.pass_obj
def validate(obj: Context, file: str) -> None:
    read_pipeline_file(file)  # clear error for unreadable files before the DSL sees them
    errors = validate_file(file)
    fmt = _output(obj)
    if errors:
        if fmt == "table":
            die("\n\n".join(e.render() for e in errors), EXIT_INVALID)
        rows = [
            {"file": e.filename, "line": e.line, "column": e.col, "message": e.message, "hint": e.hint or ""}
            for e in errors
        ]
        click.echo(render({"valid": False, "errors": rows}, fmt))
        sys.exit(EXIT_INVALID)
    click.echo(render({"valid": True, "file": file}, fmt) if fmt != "table" else f"{file}: valid")


@ctl.command(help="Show the merged DAGs a pipeline file produces: which pipelines share which stages.")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(EXPLAIN_FORMATS), default="tree", show_default=True)
def explain(file: str, fmt: str) -> None:
    read_pipeline_file(file)
    try:
        click.echo(explain_file(file, fmt).rstrip("\n"))  # type: ignore[arg-type]
    except DslErrors as e:
        die(str(e), EXIT_INVALID)


def _output(obj: Context) -> str:
    try:
        config = obj.load({"ctl": obj.ctl_overrides})
    except ConfigError as e:
        die(str(e), EXIT_INVALID)
    return config.ctl.output
