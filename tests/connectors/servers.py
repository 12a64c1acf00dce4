"""Real servers for the Kafka, S3, ClickHouse and NATS connector tests, started on loopback: the package's
own (`etlrouter.dev.servers`, which `etlrouter dev --example seed` starts too), in temporary directories.

Each `*_binary()` returns the executable or the reason it is missing (to skip, or fail under CI).
"""

from __future__ import annotations

from etlrouter.dev.servers import (
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    clickhouse,
    clickhouse_binary,
    clickhouse_query,
    found,
    nats_binary,
    nats_server,
    s3_client,
    seaweedfs,
    tansu,
    tansu_binary,
    weed_binary,
)

__all__ = [
    "S3_ACCESS_KEY",
    "S3_SECRET_KEY",
    "clickhouse",
    "clickhouse_binary",
    "clickhouse_query",
    "found",
    "nats_binary",
    "nats_server",
    "s3_client",
    "seaweedfs",
    "tansu",
    "tansu_binary",
    "weed_binary",
]
