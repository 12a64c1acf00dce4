"""State shared by every subcommand of the CLI: where configuration comes from."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, NoReturn

import click
import msgspec

from etlrouter.core.config import Config, ConfigError, load_config

EXIT_INVALID_INPUT = 2


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
        return load_config(self.config_file, overrides=layers)


def fail_config(err: ConfigError) -> NoReturn:
    click.echo(str(err), err=True)
    sys.exit(EXIT_INVALID_INPUT)
