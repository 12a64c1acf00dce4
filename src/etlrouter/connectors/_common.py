"""What every reference connector's command line shares: where to listen and how to log."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from etlrouter import __version__
from etlrouter.sdk import Service, run

_F = TypeVar("_F", bound=Callable[..., Any])

VERSION = __version__


def server_options(command: _F) -> _F:
    """Add --host, --port, --log-level, --log-format to a click command."""
    options = [
        click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on."),
        click.option("--port", type=click.IntRange(0, 65535), default=50051, show_default=True),
        click.option(
            "--log-level",
            type=click.Choice(["debug", "info", "warning", "error"]),
            default="info",
            show_default=True,
        ),
        click.option(
            "--log-format", type=click.Choice(["auto", "text", "json"]), default="auto", show_default=True
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def serve_service(service: Service, *, host: str, port: int, log_level: str, log_format: str) -> None:
    run(service, host=host, port=port, log_level=log_level, log_format=log_format)


def invoke(command: click.Command, args: Sequence[str] | None, prog_name: str) -> None:
    """Run a click command as a program (exits the process with its status)."""
    command.main(args=list(args) if args is not None else None, prog_name=prog_name)
