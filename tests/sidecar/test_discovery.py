"""Discovery against real services on real sockets: SDK services, a gRPC server without reflection, one
with only v1alpha reflection, an HTTP/1 server, a silent TCP listener and closed ports."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.reflection._deprecated import ServerReflection as ServerReflectionV1Alpha
from grpclib.reflection.service import ServerReflection
from grpclib.server import Server

from etlrouter._proto.v1 import records_pb2, services_grpc, services_pb2
from etlrouter.core.config import parse_port_list
from etlrouter.core.grpc import service_names
from etlrouter.sdk import (
    Capabilities,
    Lookup,
    LookupResult,
    Pulled,
    Record,
    RecordTransform,
    Sink,
    Source,
    Written,
    grpc_handlers,
    serving,
)
from etlrouter.sidecar.discovery import (
    MAX_CAPABILITIES_BYTES,
    Discovery,
    classify,
    disambiguate,
    next_ports,
    probe_port,
    service_name,
    services_differ,
)
from etlrouter.sidecar.model import LocalService, ServiceCapabilities
from tests.conftest import free_port

SIDECAR = "sc-test"


class Orders(Source):
    capabilities = Capabilities(name="orders-src", version="2", partitions=4, labels={"format": "json"})

    async def pull(self, *, max_records: int, max_bytes: int, wait_ms: int, partitions: Any) -> Pulled:
        return Pulled()

    async def acknowledge(self, partition: int, up_to_offset: int) -> None:
        pass


class Clean(RecordTransform):
    capabilities = Capabilities(one_to_one=True)  # no declared name

    def transform(self, record: Record, options: Any) -> Record:
        return record


class Warehouse(Sink):
    capabilities = Capabilities(idempotent_writes=True, requires_flush=True)  # no declared name

    async def write(self, batch_id: str, records: Any, options: Any) -> Written | None:
        return None


class Countries(Lookup):
    capabilities = Capabilities(name="countries", max_concurrency=8)

    async def lookup(self, key: bytes) -> LookupResult | None:
        return None


class Database(Sink, Lookup):
    """One object serving two kinds under one declared name."""

    capabilities = Capabilities(name="db")

    async def write(self, batch_id: str, records: Any, options: Any) -> Written | None:
        return None

    async def lookup(self, key: bytes) -> LookupResult | None:
        return None


class Bloated(Sink):
    capabilities = Capabilities(name="bloated", labels={"x": "y" * (MAX_CAPABILITIES_BYTES + 1)})

    async def write(self, batch_id: str, records: Any, options: Any) -> Written | None:
        return None


class NoCapabilities(services_grpc.TransformServiceBase):
    """A transform (as another language might write it) that does not implement GetCapabilities."""

    async def ProcessBatch(self, stream: Any) -> None:
        request = await stream.recv_message()
        await stream.send_message(services_pb2.ProcessBatchResponse(batch=request.batch))

    async def GetCapabilities(self, stream: Any) -> None:
        raise GRPCError(Status.UNIMPLEMENTED, "GetCapabilities")


@contextlib.asynccontextmanager
async def grpclib_server(handlers: list[Any]) -> AsyncIterator[int]:
    server = Server(handlers)
    await server.start("127.0.0.1", 0)
    try:
        yield int(server._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def http1_server() -> AsyncIterator[int]:
    app = web.Application()

    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="hello")

    app.router.add_get("/", hello)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def silent_listener() -> AsyncIterator[int]:
    """Accepts connections and never says a word."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def late_proxy(target: int, delay_s: float) -> AsyncIterator[int]:
    """Forwards to `target` after holding each new connection for `delay_s` (a service busy starting)."""
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(delay_s)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        for task in (pipe(reader, up_writer), pipe(up_reader, writer)):
            tasks.add(asyncio.ensure_future(task))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def v1alpha_only_reflection(*handlers: Any) -> list[Any]:
    """Handlers plus only the older v1alpha reflection service (as some gRPC stacks still serve)."""
    names = [name for h in handlers for name in service_names([h])]
    return [*handlers, ServerReflectionV1Alpha(_service_names=names)]


def by_kind(services: list[LocalService]) -> dict[str, LocalService]:
    return {s.kind: s for s in services}


# --- pure part ---------------------------------------------------------------------------------------


def test_classify_keeps_our_kinds_in_canonical_order() -> None:
    names = [
        "grpc.health.v1.Health",
        "etlrouter.v1.LookupService",
        "grpc.reflection.v1.ServerReflection",
        "etlrouter.v1.SourceService",
        "other.v1.SinkService",
        "etlrouter.v1.LookupService",
    ]
    assert classify(names) == ["source", "lookup"]
    assert classify([]) == []


def test_naming_rule() -> None:
    configured = {50052: "clean"}
    assert service_name("orders", 50052, configured, "sc") == "orders"  # declared wins
    assert service_name("", 50052, configured, "sc") == "clean"  # then configuration
    assert service_name("", 50053, configured, "sc") == "sc-50053"  # then sidecar id and port
    assert service_name("x" * 254, 50053, configured, "sc") == "sc-50053"  # the router would refuse it
    assert service_name(" padded ", 50052, configured, "sc") == "clean"


def test_next_ports_keeps_an_unanswered_port_for_a_while_and_drops_an_absent_one() -> None:
    a = (LocalService(name="a", kind="sink", endpoint="h:1"),)
    b = (LocalService(name="b", kind="source", endpoint="h:2"),)
    current, streaks = next_ports({}, {}, {1: a, 2: b}, [], 2)
    assert current == {1: a, 2: b}
    current, streaks = next_ports(current, streaks, {}, [1], 2)  # 1 busy, 2 gone
    assert current == {1: a} and streaks == {1: 1}
    current, streaks = next_ports(current, streaks, {}, [1], 2)
    assert current == {1: a} and streaks == {1: 2}
    current, streaks = next_ports(current, streaks, {}, [1], 2)  # third silent scan: dropped
    assert current == {} and streaks == {}
    current, streaks = next_ports(current, streaks, {}, [1], 2)  # never seen: not invented
    assert current == {}


def test_one_name_for_several_kinds_is_split_by_kind() -> None:
    both = [
        LocalService(name="db", kind="source", endpoint="h:1"),
        LocalService(name="db", kind="lookup", endpoint="h:1"),
        LocalService(name="db", kind="lookup", endpoint="h:2"),
        LocalService(name="other", kind="sink", endpoint="h:3"),
    ]
    assert [s.name for s in disambiguate(both)] == ["db-source", "db-lookup", "db-lookup", "other"]


def test_services_differ_ignores_order() -> None:
    a = LocalService(name="a", kind="sink", endpoint="h:1")
    b = LocalService(name="b", kind="source", endpoint="h:2")
    assert not services_differ([a, b], [b, a])
    assert services_differ([a], [a, b])
    assert services_differ([a], [LocalService(name="a2", kind="sink", endpoint="h:1")])


# --- against real servers ----------------------------------------------------------------------------


async def test_scan_classifies_names_and_reads_capabilities() -> None:
    closed = free_port()
    async with (
        serving(Orders()) as source,
        serving(Clean()) as transform,
        serving(Warehouse(), Countries()) as two_kinds,
        grpclib_server(ServerReflection.extend([NoCapabilities()])) as no_caps,
        grpclib_server(v1alpha_only_reflection(NoCapabilities())) as v1alpha_only,
    ):
        ports = [source.port, transform.port, two_kinds.port, no_caps, v1alpha_only, closed]
        discovery = Discovery(SIDECAR, ports, names={transform.port: "clean", two_kinds.port: "ignored"})
        found = await discovery.scan()

    assert sorted((s.endpoint, s.kind, s.name) for s in found) == sorted(
        [
            (f"127.0.0.1:{source.port}", "source", "orders-src"),
            (f"127.0.0.1:{transform.port}", "transform", "clean"),
            (f"127.0.0.1:{two_kinds.port}", "sink", "ignored"),  # configured name for the port
            (f"127.0.0.1:{two_kinds.port}", "lookup", "countries"),  # declared name wins
            (f"127.0.0.1:{no_caps}", "transform", f"{SIDECAR}-{no_caps}"),
            (f"127.0.0.1:{v1alpha_only}", "transform", f"{SIDECAR}-{v1alpha_only}"),
        ]
    )
    orders = next(s for s in found if s.name == "orders-src")
    assert orders.capabilities == ServiceCapabilities(
        name="orders-src", version="2", partitions=4, labels={"format": "json"}
    )
    assert records_pb2.Capabilities.FromString(orders.capabilities_proto) == Orders.capabilities.to_proto()
    sink = by_kind([s for s in found if s.endpoint.endswith(f":{two_kinds.port}")])["sink"]
    assert sink.capabilities.idempotent_writes and sink.capabilities.requires_flush
    assert sink.capabilities.max_concurrency == 1 and sink.capabilities.partitions == 1  # 0 means 1
    defaults = next(s for s in found if s.endpoint.endswith(f":{no_caps}"))
    assert defaults.capabilities == ServiceCapabilities() and defaults.capabilities_proto == b""


async def test_ports_that_are_not_our_services_are_skipped_quickly() -> None:
    closed = [free_port() for _ in range(7)]
    async with (
        http1_server() as http,
        grpclib_server(grpc_handlers(Warehouse())) as no_reflection,
        serving(Bloated()) as bloated,
    ):
        # A gRPC server with reflection but none of our services: found, offers nothing.
        async with grpclib_server(ServerReflection.extend([])) as unrelated:
            dead = [*closed, http, no_reflection, unrelated]
            assert len(dead) == 10
            started = time.monotonic()
            found = await Discovery(SIDECAR, dead).scan()
            elapsed = time.monotonic() - started
        assert found == []
        assert elapsed < 1.0, f"scanning 10 dead ports took {elapsed:.2f} s"
        assert (await probe_port("127.0.0.1", http)).reason.startswith("not HTTP/2")
        assert (await probe_port("127.0.0.1", no_reflection)).reason == "no gRPC server reflection"
        # Capabilities beyond the bound: the service is refused, not registered with a wrong name.
        assert await Discovery(SIDECAR, [bloated.port]).scan() == []


async def test_a_silent_listener_costs_a_short_timeout_and_one_longer_retry() -> None:
    async with contextlib.AsyncExitStack() as stack:
        silent = [await stack.enter_async_context(silent_listener()) for _ in range(10)]
        started = time.monotonic()
        found = await Discovery(SIDECAR, silent, connect_timeout_s=0.25).scan()
        elapsed = time.monotonic() - started
    assert found == []
    # 0.25 s, then 1 s for the retry, every port at once (not 10 x 1.25 s)
    assert elapsed < 3.0, f"scanning 10 silent listeners took {elapsed:.2f} s"
    probe = await probe_port("127.0.0.1", free_port())
    assert probe.outcome == "absent" and "Refused" in probe.reason


async def test_a_service_slower_than_the_first_timeout_is_found_in_the_same_scan() -> None:
    # The CI flake: under load every port missed the 0.25 s handshake and the scan found nothing.
    async with serving(Orders()) as source, late_proxy(source.port, delay_s=0.5) as late:
        assert (await probe_port("127.0.0.1", late, connect_timeout_s=0.25)).outcome == "unanswered"
        found = await Discovery(SIDECAR, [late], connect_timeout_s=0.25).scan()
    assert [(s.endpoint, s.name) for s in found] == [(f"127.0.0.1:{late}", "orders-src")]


async def test_one_object_of_two_kinds_gets_one_name_per_kind() -> None:
    async with serving(Database()) as db:
        found = await Discovery(SIDECAR, [db.port]).scan()
    assert sorted((s.kind, s.name) for s in found) == [("lookup", "db-lookup"), ("sink", "db-sink")]


async def test_a_port_list_from_configuration_with_a_bounded_concurrency() -> None:
    async with serving(Countries()) as lookup:
        spec = f"{lookup.port},{lookup.port}"  # duplicates are scanned once
        discovery = Discovery(SIDECAR, parse_port_list(spec), concurrency=1)
        assert [s.name for s in await discovery.scan()] == ["countries"]
        assert discovery.ports == [lookup.port]


async def test_run_reports_services_that_start_late_and_ones_that_disappear() -> None:
    port_a, port_b = free_port(), free_port()
    changes: asyncio.Queue[list[LocalService]] = asyncio.Queue()

    async def on_change(services: list[LocalService]) -> None:
        await changes.put(services)

    async def next_change() -> list[str]:
        services = await asyncio.wait_for(changes.get(), 5)
        return sorted(f"{s.name}@{s.endpoint.rsplit(':', 1)[1]}" for s in services)

    discovery = Discovery(SIDECAR, [port_a, port_b], interval_s=0.05)
    task = asyncio.create_task(discovery.run(on_change))
    try:
        assert await next_change() == []  # the first scan is always reported
        async with serving(Countries(), port=port_a):
            assert await next_change() == [f"countries@{port_a}"]
            async with serving(Orders(), port=port_b):
                assert await next_change() == [f"countries@{port_a}", f"orders-src@{port_b}"]
                await asyncio.sleep(0.3)  # several unchanged scans: nothing reported
                assert changes.empty()
            assert await next_change() == [f"countries@{port_a}"]
        assert await next_change() == []
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_run_after_scan_reports_only_changes_and_retries_a_failed_handler() -> None:
    async with serving(Countries()) as lookup:
        discovery = Discovery(SIDECAR, [lookup.port], interval_s=0.05)
        assert [s.name for s in await discovery.scan()] == ["countries"]
        calls: list[list[str]] = []
        failed = asyncio.Event()

        def on_change(services: list[LocalService]) -> None:
            calls.append([s.name for s in services])
            if len(calls) == 1:
                failed.set()
                raise RuntimeError("the cluster client is busy")

        task = asyncio.create_task(discovery.run(on_change))
        try:
            await asyncio.sleep(0.3)
            assert calls == []  # the set did not change since scan()
            await lookup.stop()
            await asyncio.wait_for(failed.wait(), 5)
            deadline = time.monotonic() + 5
            while len(calls) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert calls[:2] == [[], []]  # reported again after the handler failed
            await asyncio.sleep(0.3)
            assert len(calls) == 2
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def test_service_names_of_the_contract_match_the_generated_code() -> None:
    handlers = [
        *grpc_handlers(Orders()),
        *grpc_handlers(Clean()),
        *grpc_handlers(Warehouse()),
        *grpc_handlers(Countries()),
    ]
    assert classify(service_names(handlers)) == ["source", "transform", "sink", "lookup"]
