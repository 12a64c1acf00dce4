"""What the NATS JetStream source and sink share: connection options (user/password, token, credentials
file, TLS) passed through to nats-py, and the header that carries a record's key."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any, TypeVar

import click

_F = TypeVar("_F", bound=Callable[..., Any])

KEY_HEADER = "Etl-Key"


class NatsOptions:
    def __init__(
        self,
        servers: str,
        *,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        creds_file: str | None = None,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.servers = [s.strip() for s in servers.split(",") if s.strip()]
        if not self.servers:
            raise ValueError("--url must name at least one nats:// server")
        if (user is None) != (password is None):
            raise ValueError("--user and --password go together")
        if (tls_cert_file is None) != (tls_key_file is None):
            raise ValueError(
                "--tls-cert-file and --tls-key-file go together (a client certificate and its key)"
            )
        self.user, self.password, self.token, self.creds_file = user, password, token, creds_file
        self.tls_ca_file, self.tls_cert_file, self.tls_key_file = tls_ca_file, tls_cert_file, tls_key_file
        self.connect_timeout_s = connect_timeout_s

    def kwargs(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "servers": self.servers,
            "connect_timeout": self.connect_timeout_s,
            "max_reconnect_attempts": -1,  # keep trying: calls fail as retryable meanwhile
            "allow_reconnect": True,
        }
        if self.user is not None:
            options.update(user=self.user, password=self.password)
        if self.token is not None:
            options["token"] = self.token
        if self.creds_file is not None:
            options["user_credentials"] = self.creds_file
        if self.tls_ca_file or self.tls_cert_file:
            context = ssl.create_default_context(cafile=self.tls_ca_file)
            if self.tls_cert_file:
                context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
            options["tls"] = context
        return options


def nats_options(command: _F) -> _F:
    options = [
        click.option(
            "--url", required=True, envvar="ETLROUTER_NATS_URL", help="nats://host:4222[,nats://...]"
        ),
        click.option("--user", envvar="ETLROUTER_NATS_USER"),
        click.option("--password", envvar="ETLROUTER_NATS_PASSWORD", help="Prefer the env var."),
        click.option("--token", envvar="ETLROUTER_NATS_TOKEN"),
        click.option("--creds-file", type=click.Path(exists=True, dir_okay=False)),
        click.option("--tls-ca-file", type=click.Path(exists=True, dir_okay=False)),
        click.option("--tls-cert-file", type=click.Path(exists=True, dir_okay=False)),
        click.option("--tls-key-file", type=click.Path(exists=True, dir_okay=False)),
        click.option("--key-header", default=KEY_HEADER, show_default=True, help="Header carrying the key."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def nats_from_flags(flags: dict[str, Any]) -> NatsOptions:
    names = ("user", "password", "token", "creds_file", "tls_ca_file", "tls_cert_file", "tls_key_file")
    try:
        return NatsOptions(flags.pop("url"), **{name: flags.pop(name) for name in names})
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
