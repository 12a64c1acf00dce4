"""What the Kafka source and sink share: the client's connection options (SASL/TLS passed through to aiokafka)
and the header mapping between Kafka's (str, bytes) pairs and a record's string headers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import click

_F = TypeVar("_F", bound=Callable[..., Any])

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class KafkaClientOptions:
    """Connection settings, turned into aiokafka keyword arguments by `kwargs()`."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        security_protocol: str = "PLAINTEXT",
        sasl_mechanism: str | None = None,
        sasl_username: str | None = None,
        sasl_password: str | None = None,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        client_id: str = "etlrouter",
    ) -> None:
        if not bootstrap_servers.strip():
            raise ValueError("--bootstrap-servers must name at least one host:port")
        if security_protocol not in SECURITY_PROTOCOLS:
            raise ValueError(f"--security-protocol must be one of {', '.join(SECURITY_PROTOCOLS)}")
        sasl = security_protocol.startswith("SASL_")
        if sasl and (not sasl_username or sasl_password is None):
            raise ValueError(
                f"--security-protocol {security_protocol} needs --sasl-username and --sasl-password"
            )
        if not sasl and (sasl_mechanism or sasl_username):
            raise ValueError(
                "--sasl-mechanism/--sasl-username need --security-protocol SASL_PLAINTEXT or SASL_SSL"
            )
        if sasl_mechanism is not None and sasl_mechanism not in SASL_MECHANISMS:
            raise ValueError(f"--sasl-mechanism must be one of {', '.join(SASL_MECHANISMS)}")
        if (tls_cert_file is None) != (tls_key_file is None):
            raise ValueError(
                "--tls-cert-file and --tls-key-file go together (a client certificate and its key)"
            )
        tls = security_protocol in ("SSL", "SASL_SSL")
        if not tls and (tls_ca_file or tls_cert_file):
            raise ValueError("--tls-* options need --security-protocol SSL or SASL_SSL")
        self.bootstrap_servers = bootstrap_servers
        self.security_protocol = security_protocol
        self.sasl_mechanism = sasl_mechanism or "PLAIN"
        self.sasl_username = sasl_username
        self.sasl_password = sasl_password
        self.tls_ca_file = tls_ca_file
        self.tls_cert_file = tls_cert_file
        self.tls_key_file = tls_key_file
        self.client_id = client_id

    def kwargs(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "client_id": self.client_id,
        }
        if self.security_protocol.startswith("SASL_"):
            options.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            options["ssl_context"] = create_ssl_context(
                cafile=self.tls_ca_file, certfile=self.tls_cert_file, keyfile=self.tls_key_file
            )
        return options


def client_options(command: _F) -> _F:
    """Add the connection flags shared by kafka-source and kafka-sink."""
    options = [
        click.option(
            "--bootstrap-servers",
            required=True,
            envvar="ETLROUTER_KAFKA_BOOTSTRAP_SERVERS",
            help="Comma-separated host:port list.",
        ),
        click.option(
            "--security-protocol",
            type=click.Choice(SECURITY_PROTOCOLS),
            default="PLAINTEXT",
            show_default=True,
        ),
        click.option("--sasl-mechanism", type=click.Choice(SASL_MECHANISMS)),
        click.option("--sasl-username", envvar="ETLROUTER_KAFKA_SASL_USERNAME"),
        click.option("--sasl-password", envvar="ETLROUTER_KAFKA_SASL_PASSWORD", help="Prefer the env var."),
        click.option("--tls-ca-file", type=click.Path(exists=True, dir_okay=False)),
        click.option("--tls-cert-file", type=click.Path(exists=True, dir_okay=False)),
        click.option("--tls-key-file", type=click.Path(exists=True, dir_okay=False)),
        click.option("--client-id", default="etlrouter", show_default=True),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def client_from_flags(flags: dict[str, Any]) -> KafkaClientOptions:
    """Pop the `client_options` flags out of a click command's keyword arguments."""
    names = (
        "security_protocol",
        "sasl_mechanism",
        "sasl_username",
        "sasl_password",
        "tls_ca_file",
        "tls_cert_file",
        "tls_key_file",
        "client_id",
    )
    try:
        return KafkaClientOptions(flags.pop("bootstrap_servers"), **{name: flags.pop(name) for name in names})
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def headers_from_kafka(headers: Iterable[tuple[str, bytes | None]]) -> dict[str, str]:
    """Kafka header values are bytes, record headers strings: UTF-8, with undecodable bytes as \\xNN escapes.
    A repeated header name keeps its last value."""
    return {name: (value or b"").decode("utf-8", "backslashreplace") for name, value in headers}


def headers_to_kafka(headers: dict[str, str]) -> list[tuple[str, bytes]]:
    return [(name, value.encode()) for name, value in headers.items()]
