"""Reference connectors built on `etlrouter.sdk`; run one with `python -m etlrouter.connectors.MODULE`.

`CONNECTORS` maps a connector name to its `main(args)`; the modules are imported only when called, so
`python -m etlrouter.connectors.generator` does not import every connector first.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence


def _lazy_main(module: str) -> Callable[[Sequence[str] | None], None]:
    def main(args: Sequence[str] | None = None) -> None:
        importlib.import_module(f"etlrouter.connectors.{module}").main(args)

    main.__name__ = f"{module}_main"
    main.__doc__ = f"Run the connector in etlrouter.connectors.{module} with these command-line arguments."
    return main


# name -> main(args): `etlrouter connector NAME ARGS...` can dispatch here.
CONNECTORS: dict[str, Callable[[Sequence[str] | None], None]] = {
    "generator": _lazy_main("generator"),
    "jsonl-file-source": _lazy_main("jsonl_file_source"),
    "jsonl-file-sink": _lazy_main("jsonl_file_sink"),
    "filter": _lazy_main("filter"),
    "map": _lazy_main("map"),
    "lookup-file": _lazy_main("lookup_file"),
    "stdout": _lazy_main("stdout"),
    "postgres": _lazy_main("postgres"),  # needs asyncpg
    "redis-streams": _lazy_main("redis_streams"),  # needs redis
    "http-ingest": _lazy_main("http_ingest"),  # a push source
    "kafka-source": _lazy_main("kafka_source"),  # needs aiokafka
    "kafka-sink": _lazy_main("kafka_sink"),  # needs aiokafka
    "clickhouse": _lazy_main("clickhouse"),  # HTTP interface (aiohttp)
    "s3": _lazy_main("s3"),  # needs aiobotocore
    "nats-source": _lazy_main("nats_source"),  # needs nats-py
    "nats-sink": _lazy_main("nats_sink"),  # needs nats-py
}

__all__ = ["CONNECTORS"]
