"""Fixtures the system tests share with the connector tests: a real PostgreSQL server."""

from __future__ import annotations

from tests.connectors.conftest import postgres_dsn

__all__ = ["postgres_dsn"]
