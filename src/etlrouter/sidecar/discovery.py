"""Discovery: find the user services listening on the sidecar's local ports by gRPC server reflection.

For every configured port the sidecar asks `grpc.reflection.v1.ServerReflection` (falling back to
`v1alpha`) which services it serves, keeps the etlrouter.v1 Source/Transform/Sink/LookupService ones
(one `LocalService` per kind), asks each for its `GetCapabilities` and names it. Ports that are closed,
speak HTTP/1 or anything else, or serve gRPC without reflection are skipped quickly and quietly.

Pure part: `classify`, `service_name`, `capabilities_from_proto`, `local_services`, `next_ports`,
`services_differ`. I/O part: `probe_port` (one port) and `Discovery` (a bounded concurrent scan and the
periodic loop that reports changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import msgspec
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.reflection.v1 import reflection_grpc as reflection_v1_grpc
from grpclib.reflection.v1 import reflection_pb2 as reflection_v1_pb2
from grpclib.reflection.v1alpha import reflection_grpc as reflection_v1alpha_grpc
from grpclib.reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2

from etlrouter._proto.v1 import records_pb2, services_grpc
from etlrouter.core.config import TransportConfig
from etlrouter.core.grpc import open_channel
from etlrouter.sidecar.model import LocalService, ServiceCapabilities, ServiceKind

log = logging.getLogger(__name__)

# The contract: these fully qualified gRPC service names make a port a user service of that kind.
KIND_OF_SERVICE: dict[str, ServiceKind] = {
    "etlrouter.v1.SourceService": "source",
    "etlrouter.v1.TransformService": "transform",
    "etlrouter.v1.SinkService": "sink",
    "etlrouter.v1.LookupService": "lookup",
}
_KIND_ORDER: tuple[ServiceKind, ...] = ("source", "transform", "sink", "lookup")
_CAPABILITIES_STUB: dict[ServiceKind, Any] = {
    "source": services_grpc.SourceServiceStub,
    "transform": services_grpc.TransformServiceStub,
    "sink": services_grpc.SinkServiceStub,
    "lookup": services_grpc.LookupServiceStub,
}

# Bounds on what a local port may send us.
MAX_SERVICE_NAMES = 1000  # reflection list entries looked at
MAX_GRPC_SERVICE_NAME = 512  # characters of one reflected service name
MAX_CAPABILITIES_BYTES = 16 << 10  # an encoded Capabilities larger than this is refused
MAX_NAME = 253  # the router's limit for service names (a Kubernetes DNS subdomain)

ProbeOutcome = Literal["found", "absent", "unanswered"]
OnChange = Callable[[list[LocalService]], Awaitable[None] | None]


# --- pure part ---------------------------------------------------------------------------------------


def classify(service_names: Iterable[str]) -> list[ServiceKind]:
    """The kinds a port offers, from the gRPC service names its reflection lists (canonical order)."""
    found = {KIND_OF_SERVICE[name] for name in service_names if name in KIND_OF_SERVICE}
    return [kind for kind in _KIND_ORDER if kind in found]


def valid_name(name: str) -> bool:
    return 0 < len(name) <= MAX_NAME and name == name.strip() and name.isprintable()


def service_name(declared: str, port: int, configured: Mapping[int, str], sidecar_id: str) -> str:
    """The logical name: the declared Capabilities.name, else the configured name of the port, else
    "<sidecar id>-<port>". A declared name the router would refuse (empty, too long, blanks around it or
    unprintable characters) does not count as declared."""
    if valid_name(declared):
        return declared
    if port in configured and valid_name(configured[port]):
        return configured[port]
    return f"{sidecar_id}-{port}"


def capabilities_from_proto(pb: records_pb2.Capabilities) -> ServiceCapabilities:
    """The model's view of a declared Capabilities (0 means 1 for concurrency and partitions)."""
    return ServiceCapabilities(
        name=pb.name,
        version=pb.version,
        max_batch_records=pb.max_batch_records,
        max_batch_bytes=pb.max_batch_bytes,
        max_concurrency=pb.max_concurrency or 1,
        requires_flush=pb.requires_flush,
        idempotent_writes=pb.idempotent_writes,
        one_to_one=pb.one_to_one,
        partitions=pb.partitions or 1,
        labels=dict(sorted(pb.labels.items())),
    )


class Offer(msgspec.Struct, frozen=True):
    """One kind a port serves, with the encoded Capabilities it declared (b"" when UNIMPLEMENTED)."""

    kind: ServiceKind
    capabilities_proto: bytes = b""


class PortProbe(msgspec.Struct, frozen=True):
    """What asking one port found.

    "found": a reflective gRPC server (offers may be empty when it serves none of our services);
    "absent": closed, not gRPC, no reflection, or a broken service (definitive for this scan);
    "unanswered": it did not answer in time or answered with a transient error (may be busy).
    """

    port: int
    outcome: ProbeOutcome
    offers: tuple[Offer, ...] = ()
    reason: str = ""


def local_services(
    probe: PortProbe, host: str, sidecar_id: str, configured: Mapping[int, str]
) -> tuple[LocalService, ...]:
    """The LocalServices a found port offers; raises ValueError naming the problem for bad capabilities."""
    services: list[LocalService] = []
    for offer in probe.offers:
        if len(offer.capabilities_proto) > MAX_CAPABILITIES_BYTES:
            raise ValueError(
                f"{offer.kind} service on port {probe.port}: Capabilities of {len(offer.capabilities_proto)}"
                f" bytes exceed the {MAX_CAPABILITIES_BYTES} byte limit"
            )
        pb = records_pb2.Capabilities.FromString(offer.capabilities_proto)
        services.append(
            LocalService(
                name=service_name(pb.name, probe.port, configured, sidecar_id),
                kind=offer.kind,
                endpoint=_endpoint(host, probe.port),
                capabilities=capabilities_from_proto(pb),
                capabilities_proto=offer.capabilities_proto,
            )
        )
    return tuple(services)


def disambiguate(services: Sequence[LocalService]) -> list[LocalService]:
    """A service name has one kind cluster-wide (the router refuses a registration that breaks this).
    When services found here share a name across kinds (one object serving a source and a lookup, say),
    each of them is named "<name>-<kind>" instead."""
    kinds: dict[str, set[ServiceKind]] = {}
    for service in services:
        kinds.setdefault(service.name, set()).add(service.kind)
    return [
        msgspec.structs.replace(service, name=f"{service.name}-{service.kind}")
        if len(kinds[service.name]) > 1
        else service
        for service in services
    ]


def next_ports(
    previous: Mapping[int, tuple[LocalService, ...]],
    unanswered_streak: Mapping[int, int],
    found: Mapping[int, tuple[LocalService, ...]],
    unanswered: Iterable[int],
    keep_unanswered_scans: int,
) -> tuple[dict[int, tuple[LocalService, ...]], dict[int, int]]:
    """The services per port after a scan, and the new unanswered streaks.

    A found port replaces what was known about it; an absent port drops it. A port that did not answer
    keeps its previous services for up to `keep_unanswered_scans` scans in a row (a busy service is not a
    gone one), then is dropped."""
    current = {port: services for port, services in found.items() if services}
    streaks: dict[int, int] = {}
    for port in unanswered:
        if port in previous:
            streak = unanswered_streak.get(port, 0) + 1
            if streak <= keep_unanswered_scans:
                current[port] = previous[port]
                streaks[port] = streak
    return dict(sorted(current.items())), streaks


def _canonical(services: Iterable[LocalService]) -> list[LocalService]:
    return sorted(services, key=lambda s: (s.endpoint, s.kind, s.name))


def services_differ(old: Sequence[LocalService], new: Sequence[LocalService]) -> bool:
    """True when two scans found different services (order does not matter)."""
    return _canonical(old) != _canonical(new)


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- I/O part ----------------------------------------------------------------------------------------

_Reflection = tuple[type, type]
_REFLECTIONS: tuple[_Reflection, ...] = (
    (reflection_v1_grpc.ServerReflectionStub, reflection_v1_pb2.ServerReflectionRequest),
    (reflection_v1alpha_grpc.ServerReflectionStub, reflection_v1alpha_pb2.ServerReflectionRequest),
)
_TRANSIENT = frozenset(
    {Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED, Status.RESOURCE_EXHAUSTED, Status.CANCELLED}
)


class Unanswered(Exception):
    pass


async def list_services(channel: Channel, timeout: float) -> list[str] | None:
    """Service names from reflection (v1, else v1alpha); None when the server has no reflection."""
    for stub_class, request_class in _REFLECTIONS:
        method = stub_class(channel).ServerReflectionInfo
        try:
            async with method.open(timeout=timeout) as stream:
                await stream.send_message(request_class(list_services="*"), end=True)
                reply = await stream.recv_message()
                with contextlib.suppress(Exception):
                    await stream.cancel()  # one answer is all we read; do not wait for the rest
        except GRPCError as e:
            if e.status in _TRANSIENT:
                raise Unanswered(f"reflection: {e.status.name}: {e.message}") from None
            # UNIMPLEMENTED (or, from grpclib servers, UNKNOWN "Missing content-type header"): try the
            # other version of the reflection protocol.
            continue
        if reply is None or not reply.HasField("list_services_response"):
            return None
        names = [s.name for s in reply.list_services_response.service[:MAX_SERVICE_NAMES]]
        return [name for name in names if len(name) <= MAX_GRPC_SERVICE_NAME]
    return None


async def _capabilities(channel: Channel, kind: ServiceKind, timeout: float) -> bytes:
    stub = _CAPABILITIES_STUB[kind](channel)
    try:
        reply = await stub.GetCapabilities(records_pb2.GetCapabilitiesRequest(), timeout=timeout)
    except GRPCError as e:
        if e.status == Status.UNIMPLEMENTED:
            return b""
        raise Unanswered(f"{kind} GetCapabilities: {e.status.name}: {e.message}") from None
    if not reply.HasField("capabilities"):
        return b""
    return bytes(reply.capabilities.SerializeToString(deterministic=True))


class NotHttp2(Exception):
    pass


# An HTTP/2 client connection preface followed by an empty SETTINGS frame (RFC 9113, section 3.4).
_CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_FRAME_SETTINGS = 0x04


async def http2_handshake(host: str, port: int, timeout: float) -> None:
    """Connect and check the peer answers the HTTP/2 preface with a SETTINGS frame, as every gRPC server
    does at once: closed ports, HTTP/1 servers and silent listeners are told apart in one round trip."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(_CLIENT_PREFACE)
            await writer.drain()
            try:
                header = await reader.readexactly(9)
            except asyncio.IncompleteReadError as e:
                raise NotHttp2(f"not HTTP/2: the peer sent {len(e.partial)} bytes and closed") from None
            if header[3] != _FRAME_SETTINGS:
                raise NotHttp2(f"not HTTP/2: the peer answered {header[:9]!r}")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def probe_port(
    host: str,
    port: int,
    *,
    connect_timeout_s: float = 0.25,
    call_timeout_s: float = 1.0,
    transport_config: TransportConfig | None = None,
) -> PortProbe:
    """Ask one port what it serves. Never raises for anything the port does; the whole probe is bounded
    by 2 * connect_timeout_s + 2 * call_timeout_s (a port that does not even answer the HTTP/2 handshake
    costs connect_timeout_s)."""
    try:
        await http2_handshake(host, port, connect_timeout_s)
    except TimeoutError:  # before OSError, of which it is a subclass
        return PortProbe(port, "unanswered", reason=f"no HTTP/2 handshake within {connect_timeout_s} s")
    except OSError as e:
        return PortProbe(port, "absent", reason=f"connect: {type(e).__name__}: {e}")
    except NotHttp2 as e:
        return PortProbe(port, "absent", reason=str(e))
    channel = open_channel(_endpoint(host, port), transport_config)
    try:
        async with asyncio.timeout(connect_timeout_s + 2 * call_timeout_s):
            names = await list_services(channel, call_timeout_s)
            if names is None:
                return PortProbe(port, "absent", reason="no gRPC server reflection")
            kinds = classify(names)
            caps = await asyncio.gather(*(_capabilities(channel, kind, call_timeout_s) for kind in kinds))
            return PortProbe(port, "found", tuple(Offer(k, c) for k, c in zip(kinds, caps, strict=True)))
    except Unanswered as e:
        return PortProbe(port, "unanswered", reason=str(e))
    except TimeoutError:
        return PortProbe(port, "unanswered", reason=f"no answer within {call_timeout_s} s")
    except asyncio.CancelledError:
        raise
    except Exception as e:  # anything a non-gRPC peer makes grpclib/h2 raise: not one of ours
        return PortProbe(port, "absent", reason=f"{type(e).__name__}: {e}")
    finally:
        channel.close()


RETRY_PATIENCE = 4.0  # the timeouts of the second probe of an unanswered port, as a multiple


class Discovery:
    """Scans the configured ports concurrently (at most `concurrency` at once) and reports changes."""

    def __init__(
        self,
        sidecar_id: str,
        ports: Sequence[int],
        *,
        host: str = "127.0.0.1",
        names: Mapping[int, str] | None = None,
        interval_s: float = 10.0,
        connect_timeout_s: float = 0.25,
        call_timeout_s: float = 1.0,
        concurrency: int = 32,
        keep_unanswered_scans: int = 2,
        transport_config: TransportConfig | None = None,
    ) -> None:
        if not sidecar_id:
            raise ValueError("Discovery needs a sidecar id (it names services that declare no name)")
        if concurrency < 1:
            raise ValueError(f"Discovery concurrency must be at least 1, got {concurrency}")
        self.sidecar_id = sidecar_id
        self.ports = list(dict.fromkeys(ports))
        self.host = host
        self.names = dict(names or {})
        self.interval_s = interval_s
        self.connect_timeout_s = connect_timeout_s
        self.call_timeout_s = call_timeout_s
        self.keep_unanswered_scans = keep_unanswered_scans
        self.transport_config = transport_config
        self._semaphore = asyncio.Semaphore(concurrency)
        self._by_port: dict[int, tuple[LocalService, ...]] = {}
        self._unanswered: dict[int, int] = {}
        self._problems: dict[int, str] = {}
        self.services: list[LocalService] | None = None  # the last scan's result; None before the first

    async def _probe(self, port: int, patience: float = 1.0) -> PortProbe:
        async with self._semaphore:
            return await probe_port(
                self.host,
                port,
                connect_timeout_s=self.connect_timeout_s * patience,
                call_timeout_s=self.call_timeout_s * patience,
                transport_config=self.transport_config,
            )

    async def scan(self) -> list[LocalService]:
        """Probe every port; returns the services found (a busy port keeps its earlier ones)."""
        probes = await asyncio.gather(*(self._probe(port) for port in self.ports))
        # A port that took the connection but did not answer in time is most often a service still starting
        # or a CPU-starved pod (a throttled container stalls for whole CFS periods): asked once more with
        # RETRY_PATIENCE times the timeouts before this scan counts it unanswered, or the sidecar would
        # register without it and add it only a scan interval later.
        slow = [probe.port for probe in probes if probe.outcome == "unanswered"]
        if slow:
            again = await asyncio.gather(*(self._probe(port, RETRY_PATIENCE) for port in slow))
            retried = {probe.port: probe for probe in again}
            probes = [retried.get(probe.port, probe) for probe in probes]
        found: dict[int, tuple[LocalService, ...]] = {}
        unanswered: list[int] = []
        for probe in probes:
            problem = ""
            if probe.outcome == "found":
                try:
                    found[probe.port] = local_services(probe, self.host, self.sidecar_id, self.names)
                except Exception as e:  # an oversized or undecodable Capabilities
                    problem = f"port {probe.port} skipped: {e}"
            elif probe.outcome == "unanswered":
                unanswered.append(probe.port)
                if probe.port in self._by_port:
                    problem = f"port {probe.port} did not answer discovery: {probe.reason}"
            else:
                log.debug("port %s: nothing to discover (%s)", probe.port, probe.reason)
            self._note_problem(probe.port, problem)
        self._by_port, self._unanswered = next_ports(
            self._by_port, self._unanswered, found, unanswered, self.keep_unanswered_scans
        )
        self.services = disambiguate([service for services in self._by_port.values() for service in services])
        return list(self.services)

    def _note_problem(self, port: int, problem: str) -> None:
        """Warn about a port's problem once, not on every scan."""
        if problem and self._problems.get(port) != problem:
            log.warning("discovery: %s", problem)
        if problem:
            self._problems[port] = problem
        else:
            self._problems.pop(port, None)

    async def run(self, on_change: OnChange) -> None:
        """Scan every `interval_s` (with ±10% jitter) and call `on_change(services)` when the set of
        services differs from the previous scan's (and once after the first scan when `scan()` was not
        called before). An `on_change` that raises is logged and called again after the next scan."""
        reported = self.services
        if reported is not None:
            await asyncio.sleep(self._interval())
        while True:
            try:
                services = await self.scan()
            except Exception:
                log.exception("discovery scan failed")
                services = reported or []
            if reported is None or services_differ(reported, services):
                try:
                    result = on_change(list(services))
                    if inspect.isawaitable(result):
                        await result
                    reported = services
                except Exception:
                    log.exception("discovery: the change handler failed; retrying after the next scan")
            await asyncio.sleep(self._interval())

    def _interval(self) -> float:
        return self.interval_s * random.uniform(0.9, 1.1)
