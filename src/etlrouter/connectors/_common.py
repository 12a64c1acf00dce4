"""What every reference connector's command line shares: where to listen and how to log."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
import msgspec

from etlrouter import __version__
from etlrouter.sdk import Service, run

_F = TypeVar("_F", bound=Callable[..., Any])

VERSION = __version__


def _remember_name(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta["etlrouter.service_name"] = value


def server_options(command: _F) -> _F:
    """Add --name, --host, --port, --log-level, --log-format to a click command."""
    options = [
        click.option(
            "--name",
            expose_value=False,
            callback=_remember_name,
            help="Service name for pipelines (declared through GetCapabilities); default: the connector's.",
        ),
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
    ctx = click.get_current_context(silent=True)
    name = ctx.meta.get("etlrouter.service_name") if ctx is not None else None
    if name:
        service.capabilities = msgspec.structs.replace(service.capabilities, name=name)
    run(service, host=host, port=port, log_level=log_level, log_format=log_format)


def invoke(command: click.Command, args: Sequence[str] | None, prog_name: str) -> None:
    """Run a click command as a program (exits the process with its status)."""
    command.main(args=list(args) if args is not None else None, prog_name=prog_name)
