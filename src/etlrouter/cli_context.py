"""State shared by every subcommand of the CLI: where configuration comes from."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, NoReturn

import click
import msgspec

from etlrouter.core.config import Config, ConfigError, load_config

EXIT_INVALID_INPUT = 2

# The flag behind each configuration path the CLI sets, so a bad value is blamed on the flag the user typed.
FLAG_NAMES = {
    "logging.level": "--log-level",
    "logging.format": "--log-format",
    "router.node_id": "--node-id",
    "router.grpc.port": "--grpc-port",
    "router.http.port": "--http-port",
    "router.grpc.host": "--host",
    "router.http.host": "--host",
    "router.data_dir": "--data-dir",
    "router.peers": "--peer",
    "router.join": "--join",
    "sidecar.id": "--id",
    "sidecar.routers": "--router",
    "sidecar.scan_ports": "--scan-ports",
    "sidecar.grpc.port": "--grpc-port",
    "sidecar.http.port": "--http-port",
    "operator.namespace": "--namespace",
    "operator.kubeconfig": "--kubeconfig",
    "ctl.router": "--router",
    "ctl.output": "--output",
    "dev.data_dir": "--data-dir",
    "dev.base_port": "--base-port",
    "dev.routers": "--routers",
}


class Context(msgspec.Struct):
    config_file: str | None
    log_level: str | None
    log_format: str | None
    ctl_overrides: dict[str, Any] = {}

    def load(self, overrides: Mapping[str, Any] | None = None) -> Config:
        layers: dict[str, Any] = {}
        if self.log_level:
            layers.setdefault("logging", {})["level"] = self.log_level
        if self.log_format:
            layers.setdefault("logging", {})["format"] = self.log_format
        for key, value in (overrides or {}).items():
            layers.setdefault(key, {}).update(value)
        return load_config(self.config_file, overrides=layers, flag_names=FLAG_NAMES)


def fail_config(err: ConfigError) -> NoReturn:
    click.echo(str(err), err=True)
    sys.exit(EXIT_INVALID_INPUT)
