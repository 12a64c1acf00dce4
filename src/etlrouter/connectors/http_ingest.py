"""`http_ingest` push source: an HTTP endpoint that turns POSTed JSON into records for the pipelines.

    python -m etlrouter.connectors.http_ingest --name clicks --port 50070 --sidecar 127.0.0.1:7600 \\
        --http-port 8080
    curl -s localhost:8080/ingest --data-binary $'{"user": 1}\\n{"user": 2}'          # JSON lines
    curl -s 'localhost:8080/ingest?wait=accepted' -d '[{"user": 1}, {"user": 2}]'   # a JSON array

It serves a push-mode SourceService on --port (so its sidecar discovers and registers it as source
--name) and pushes every request's records to that sidecar (SidecarDataPlane.PushRecords, etlrouter.sdk
`Pusher`). One request is one batch. A record's value is the JSON value (a JSON-lines line as sent, an
array element re-encoded compactly); its key is the string of the field --key-field (if set and present);
its event time the integer field --event-time-field (ms) or the time of the request.

Answers:

- 200 `{"delivered": N, ...}` (the default): every branch wrote the records or put them durably in a DLQ,
  so a 2xx never stands for records that a crash of this process could still lose;
- 202 `{"accepted": N, ...}` with `?wait=accepted`: the batch is in the source's ack ledger, not yet
  delivered (the records live in this process until the sinks have them; if it dies before, they are lost);
  for clients that trade that risk for latency;
- 400: the body is not JSON lines / a JSON array; the message names the line (and column);
- 413: more than --max-body-bytes or --max-records;
- 429 + Retry-After: no credits right now, the pipeline is behind (e.g. a stalled sink); retry later;
- 503 + Retry-After: no sidecar reachable, or no pipeline reads this source yet;
- 504: not delivered within --delivered-timeout-s (it may still be; send again: batch ids make it safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import click
import msgspec
from aiohttp import web

from etlrouter.connectors._common import VERSION, invoke, server_options
from etlrouter.core.lifecycle import run_loop, serve
from etlrouter.core.logging import setup_logging
from etlrouter.sdk import Capabilities, Pusher, PushRefusedError, PushSource, Record, ServiceHost

log = logging.getLogger(__name__)

MAX_ERRORS_SHOWN = 5


class IngestError(ValueError):
    """A body that cannot become records; the message names the line."""


class IngestConfig(msgspec.Struct, frozen=True, kw_only=True):
    max_body_bytes: int = 1 << 20
    max_records: int = 10_000
    key_field: str = ""
    event_time_field: str = ""
    accept_timeout_s: float = 10.0
    delivered_timeout_s: float = 30.0


_BYTE_POSITION = re.compile(r"\(byte (\d+)\)")


def _line_and_column(body: bytes, position: int) -> tuple[int, int]:
    line = body.count(b"\n", 0, position) + 1
    return line, position - (body.rfind(b"\n", 0, position) + 1) + 1


def _record(value: bytes, item: Any, config: IngestConfig, now_ms: int) -> Record:
    key = b""
    event_time = now_ms
    if isinstance(item, dict):
        if config.key_field and config.key_field in item:
            field = item[config.key_field]
            key = (field if isinstance(field, str) else msgspec.json.encode(field).decode()).encode()
        if config.event_time_field:
            stamp = item.get(config.event_time_field)
            if isinstance(stamp, int) and not isinstance(stamp, bool) and stamp > 0:
                event_time = stamp
    return Record(key=key, value=value, event_time_ms=event_time)


def parse_body(body: bytes, config: IngestConfig, now_ms: int) -> list[Record]:
    """JSON lines, or one JSON array (the first non-blank character is `[`), into records.

    Raises IngestError naming the line (and column) of the first problem, with up to MAX_ERRORS_SHOWN
    problems for JSON lines."""
    stripped = body.lstrip()
    if stripped.startswith(b"["):
        try:
            items = msgspec.json.decode(body)
        except msgspec.DecodeError as e:
            match = _BYTE_POSITION.search(str(e))
            where = (
                "line {}, column {}".format(*_line_and_column(body, int(match.group(1)))) if match else "body"
            )
            raise IngestError(f"{where}: invalid JSON array: {e}") from None
        if not isinstance(items, list):
            raise IngestError("line 1: the body is not a JSON array")
        if len(items) > config.max_records:
            raise IngestError(f"{len(items)} records, at most {config.max_records} per request")
        return [_record(msgspec.json.encode(item), item, config, now_ms) for item in items]
    records: list[Record] = []
    errors: list[str] = []
    for number, line in enumerate(body.split(b"\n"), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            item = msgspec.json.decode(line)
        except msgspec.DecodeError as e:
            errors.append(f"line {number}: invalid JSON: {e}")
            if len(errors) >= MAX_ERRORS_SHOWN:
                break
            continue
        records.append(_record(line, item, config, now_ms))
        if len(records) > config.max_records:
            limit = config.max_records
            raise IngestError(f"more than {limit} records; at most {limit} per request")
    if errors:
        raise IngestError("; ".join(errors))
    return records


class IngestSource(PushSource):
    capabilities = Capabilities(name="http-ingest", version=VERSION, push=True, labels={"format": "json"})


TRACE_HEADERS = ("traceparent", "tracestate")


def with_trace_context(records: list[Record], request_headers: Mapping[str, str]) -> list[Record]:
    """A request sent with W3C trace context hands it to its records (as record headers), so the batch
    they form continues the caller's trace (sdk/records.py, docs/observability.md)."""
    context = {name: request_headers[name] for name in TRACE_HEADERS if request_headers.get(name)}
    if "traceparent" in context:
        for record in records:
            record.headers = {**record.headers, **context}
    return records


def _json(status: int, body: dict[str, Any], retry_after: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.Response(
        status=status, body=msgspec.json.encode(body), content_type="application/json", headers=headers
    )


class HttpIngest:
    """The connector as a `core.lifecycle.Component`: gRPC (discovery), the Pusher, the HTTP server."""

    def __init__(
        self,
        service: IngestSource,
        config: IngestConfig,
        *,
        sidecar: str,
        host: str,
        port: int,
        http_host: str,
        http_port: int,
    ) -> None:
        self.config = config
        self.service = service
        self.grpc = ServiceHost(service, host=host, port=port)
        self.pusher = Pusher(sidecar, service.capabilities.name)
        self.http_host, self.http_port = http_host, http_port
        self.app = web.Application(client_max_size=config.max_body_bytes)
        self.app.router.add_post("/ingest", self.ingest)
        self.app.router.add_post("/", self.ingest)
        self.app.router.add_get("/healthz", self.health)
        self._runner: web.AppRunner | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        await self.grpc.start()
        await self.pusher.start()
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.http_host, self.http_port)
        await site.start()
        log.info(
            "http ingest listening",
            extra={
                "fields": {
                    "http_port": self.http_port,
                    "grpc": self.grpc.address,
                    "source": self.pusher.source,
                }
            },
        )

    async def wait(self) -> None:
        await self._stopped.wait()

    async def drain(self) -> None:
        if self._runner is not None:
            await self._runner.shutdown()
        # Give what was accepted a chance to be delivered before the records held here go away.
        with contextlib.suppress(TimeoutError):
            await self.pusher.wait_acked(5.0)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.pusher.close()
        await self.grpc.stop()
        self._stopped.set()

    async def health(self, request: web.Request) -> web.Response:
        pusher = self.pusher
        return _json(200, {"ready": pusher.ready, "connected": pusher.connected, "error": pusher.last_error})

    async def ingest(self, request: web.Request) -> web.Response:
        wait = request.query.get("wait", "delivered")
        if wait not in ("delivered", "accepted"):
            return _json(400, {"error": f"?wait={wait!r}: expected `delivered` (default) or `accepted`"})
        if request.content_length is not None and request.content_length > self.config.max_body_bytes:
            return _json(
                413,
                {"error": f"body of {request.content_length} bytes, at most {self.config.max_body_bytes}"},
            )
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _json(413, {"error": f"body larger than {self.config.max_body_bytes} bytes"})
        try:
            records = parse_body(body, self.config, int(time.time() * 1000))
        except IngestError as e:
            status = 413 if "per request" in str(e) else 400
            return _json(status, {"error": str(e)})
        if not records:
            return _json(400, {"error": "the body holds no records"})
        records = with_trace_context(records, request.headers)
        pusher = self.pusher
        if not pusher.ready:
            why = pusher.last_error or "connecting to the sidecar"
            return _json(503, {"error": f"cannot take records now: {why}"}, retry_after=1)
        ticket = pusher.offer(records)
        if ticket is None:
            return _json(
                429, {"error": "the pipeline is behind (no credits right now); retry later"}, retry_after=1
            )
        info = {
            "batch_id": ticket.batch_id,
            "partition": ticket.partition,
            "first_offset": ticket.first_offset,
            "last_offset": ticket.last_offset,
        }
        try:
            await asyncio.wait_for(asyncio.shield(ticket.accepted), self.config.accept_timeout_s)
        except PushRefusedError as e:
            return _json(422, {"error": f"the sidecar refused the records: {e}", **info})
        except TimeoutError:
            return _json(
                503,
                {"error": "not accepted in time; the records are kept and may still be delivered", **info},
                retry_after=1,
            )
        if wait == "accepted":
            return _json(202, {"accepted": len(records), **info})
        try:
            await asyncio.wait_for(asyncio.shield(ticket.delivered), self.config.delivered_timeout_s)
        except TimeoutError:
            return _json(504, {"error": "accepted but not delivered in time; it may still be", **info})
        except PushRefusedError as e:
            return _json(422, {"error": f"the sidecar refused the records: {e}", **info})
        return _json(200, {"delivered": len(records), **info})


@click.command(name="http_ingest")
@click.option("--sidecar", required=True, help="HOST:PORT of the local sidecar's data plane (gRPC).")
@click.option("--http-host", default="127.0.0.1", show_default=True)
@click.option("--http-port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=1 << 20, show_default=True)
@click.option("--max-records", type=click.IntRange(min=1), default=10_000, show_default=True)
@click.option("--key-field", default="", help="JSON field whose value becomes the record key.")
@click.option("--event-time-field", default="", help="Integer JSON field (ms) for the event time.")
@click.option("--accept-timeout-s", type=click.FloatRange(min=0.1), default=10.0, show_default=True)
@click.option("--delivered-timeout-s", type=click.FloatRange(min=0.1), default=30.0, show_default=True)
@server_options
def cli(
    sidecar: str,
    http_host: str,
    http_port: int,
    max_body_bytes: int,
    max_records: int,
    key_field: str,
    event_time_field: str,
    accept_timeout_s: float,
    delivered_timeout_s: float,
    host: str,
    port: int,
    log_level: str,
    log_format: str,
) -> None:
    """Accept POSTed JSON lines or JSON arrays and push them to the local sidecar."""
    service = IngestSource()
    name = click.get_current_context().meta.get("etlrouter.service_name")
    if name:
        service.capabilities = msgspec.structs.replace(service.capabilities, name=name)
    config = IngestConfig(
        max_body_bytes=max_body_bytes,
        max_records=max_records,
        key_field=key_field,
        event_time_field=event_time_field,
        accept_timeout_s=accept_timeout_s,
        delivered_timeout_s=delivered_timeout_s,
    )
    setup_logging(service.capabilities.name, log_level, log_format)

    async def main() -> None:  # the servers must be built inside the loop that runs them
        component = HttpIngest(
            service, config, sidecar=sidecar, host=host, port=port, http_host=http_host, http_port=http_port
        )
        await serve(component, drain_deadline_s=10.0)

    run_loop(main)


def main(args: Sequence[str] | None = None) -> None:
    invoke(cli, args, "etlrouter.connectors.http_ingest")


if __name__ == "__main__":
    main()
