"""The postgres sink in the whole system: a real PostgreSQL server, 3 routers, a generator source, a filter
and the postgres sink, each service with its own sidecar. The sink service is killed (SIGKILL) mid-run and
restarted on the same port; afterwards every source offset is a row exactly once, and no offset was ever
acknowledged to the source before its row was committed.

The sink runs in `insert` mode, so it is the batch-id idempotency table (`etlrouter_batches`, one row per
written batch, inserted in the batch's own transaction) that keeps a re-delivered batch from being written
twice; `upsert` is keyed on the record key, which the generator repeats across offsets. A killed sink
service leaves its batches to be retried under the same ids. (A restarted *source sidecar* is not tested
here: the rewound source cuts its batches anew, under new ids, so insert mode may then write a row twice.)"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import pytest

from tests.e2e.processes import Processes, connector, ready, sidecar, wait_until
from tests.e2e.test_pipeline import apply
from tests.integration.cluster import RouterProcesses

TOTAL = 20_000
TABLE = "orders"
PIPELINE = """
pipeline to-postgres { source orders | transform clean (config.expr = "true") | sink warehouse }
"""


@pytest.fixture
def database(postgres_dsn: str) -> Iterator[str]:
    """A fresh database for one test: batch ids derive from stage ids and source offsets, so a second run
    of the same pipeline against the same `etlrouter_batches` would find every batch already written.
    Requested before `system`, so it is dropped only after the sink service stopped."""
    name = f"e2e_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield urlunsplit(urlsplit(postgres_dsn)._replace(path=f"/{name}"))
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


class Rows:
    """Queries on the sink's table over one connection, from synchronous test code."""

    def __init__(self, dsn: str) -> None:
        self.runner = asyncio.Runner()
        self.conn = self.runner.run(asyncpg.connect(dsn))

    def close(self) -> None:
        self.runner.run(self.conn.close())
        self.runner.close()

    def counts(self, up_to_offset: int | None = None) -> tuple[int, int]:
        """(rows, distinct source offsets) with offset <= up_to_offset (all when None); (0, 0) before the sink
        created the table."""
        where = "" if up_to_offset is None else " WHERE source_offset <= $1"
        args = () if up_to_offset is None else (up_to_offset,)
        sql = f"SELECT count(*), count(DISTINCT source_offset) FROM {TABLE}{where}"
        try:
            row = self.runner.run(self.conn.fetchrow(sql, *args))
        except asyncpg.UndefinedTableError:
            return 0, 0
        return int(row[0]), int(row[1])

    def fetch(self, sql: str) -> list[asyncpg.Record]:
        return list(self.runner.run(self.conn.fetch(sql)))


def test_postgres_sink_killed_mid_run_loses_no_row_and_duplicates_none(
    database: str, system: tuple[RouterProcesses, Processes, Path]
) -> None:
    routers, procs, tmp = system
    state = tmp / "generator.state"
    generator = ("--limit", str(TOTAL), "--rate", "4000", "--state-file", str(state))
    src = connector(procs, "orders", "generator", *generator)
    mid = connector(procs, "clean", "filter")
    sink_args = ("--dsn", database, "--table", TABLE, "--mode", "insert", "--value-type", "jsonb")
    sink = connector(procs, "warehouse", "postgres", *sink_args, "--create-table")
    http = [
        sidecar(procs, "sc-src", routers, [src]),
        sidecar(procs, "sc-mid", routers, [mid]),
        sidecar(procs, "sc-sink", routers, [sink]),
    ]
    wait_until(lambda: all(ready(p) for p in http), 30, "sidecars registered")
    apply(routers, PIPELINE)

    rows = Rows(database)
    violations: list[str] = []
    samples = 0

    def acked() -> int:
        try:
            return int(json.loads(state.read_text()).get("0", -1))
        except (OSError, ValueError):
            return -1

    def check_acks() -> None:
        # Read the ack first, then the table: every acknowledged offset must already be a committed row.
        nonlocal samples
        ack = acked()
        _, distinct = rows.counts(ack)
        samples += 1
        if distinct < ack + 1:
            violations.append(f"offset {ack} acknowledged but only {distinct} of offsets 0..{ack} are rows")

    def run_for(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            check_acks()
            time.sleep(0.05)

    def flowing() -> bool:
        check_acks()
        return rows.counts()[0] > 2000

    def all_acked() -> bool:
        check_acks()
        return acked() == TOTAL - 1

    try:
        wait_until(flowing, 30, "rows arriving in PostgreSQL")
        procs.kill("warehouse")  # the sink service dies with batches in flight ...
        at_kill, _ = rows.counts()
        run_for(1.0)
        procs.restart("warehouse")  # ... and comes back on the same port, table and batch-id table
        wait_until(all_acked, 60, "the source acknowledged every record")
        check_acks()

        total_rows, distinct = rows.counts()
        offsets = rows.fetch(f"SELECT min(source_offset) AS lo, max(source_offset) AS hi FROM {TABLE}")[0]
        duplicates = rows.fetch(
            f"SELECT source_offset, count(*) AS n FROM {TABLE} "
            "GROUP BY 1 HAVING count(*) > 1 ORDER BY 1 LIMIT 5"
        )
        batches = rows.fetch("SELECT count(*) AS n, sum(record_count) AS records FROM etlrouter_batches")[0]
    finally:
        rows.close()

    print(
        f"rows at kill: {at_kill}; samples: {samples}; rows: {total_rows}; "
        f"batches: {batches['n']} covering {batches['records']} records"
    )
    assert at_kill < TOTAL, "the sink was killed only after everything was written: not mid-run"
    assert not violations, violations[:5]
    assert not duplicates, [(r["source_offset"], r["n"]) for r in duplicates]
    assert (total_rows, distinct, offsets["lo"], offsets["hi"]) == (TOTAL, TOTAL, 0, TOTAL - 1)
    for name in ("sc-src", "sc-mid", "sc-sink", "warehouse"):
        assert "Traceback" not in procs.log(name), procs.log(name)[-3000:]
