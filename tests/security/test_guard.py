"""In-process, over real TLS sockets: the rules that depend on the request (a sidecar acts for itself; a
push comes from the pod's own identity) and the per-peer connection cap."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from etlrouter._proto.v1 import control_pb2, dataplane_pb2
from etlrouter.core.config import AuthConfig, TlsConfig
from etlrouter.core.grpc import GrpcServer, open_channel
from etlrouter.security.context import Security
from etlrouter.security.identity import ROUTER, SIDECAR
from tests.security.pki import TRUST_DOMAIN, TestPki

HEARTBEAT = "/etlrouter.v1.SidecarCoordinator/Heartbeat"
PUSH = "/etlrouter.v1.SidecarDataPlane/PushRecords"


class Echo:
    """Stands in for the real services: answers every call, so a refusal can only be the guard's."""

    def __mapping__(self) -> dict[str, Handler]:
        async def heartbeat(stream: Any) -> None:
            await stream.recv_message()
            await stream.send_message(control_pb2.SidecarHeartbeatResponse())

        async def push(stream: Any) -> None:
            await stream.recv_message()
            await stream.send_message(dataplane_pb2.PushReply())

        return {
            HEARTBEAT: Handler(
                heartbeat,
                Cardinality.UNARY_UNARY,
                control_pb2.SidecarHeartbeatRequest,
                control_pb2.SidecarHeartbeatResponse,
            ),
            PUSH: Handler(push, Cardinality.STREAM_STREAM, dataplane_pb2.PushFrame, dataplane_pb2.PushReply),
        }


def server_security(pki: TestPki, kind: Any, name: str, **tls: Any) -> Security:
    files = pki.issue(kind, name)
    config = TlsConfig(
        ca=str(files.ca), cert=str(files.cert), key=str(files.key), trust_domain=TRUST_DOMAIN, **tls
    )
    return Security(config, AuthConfig(), kind=kind, name=name)


async def heartbeat(address: str, security: Security, sidecar_id: str) -> None:
    channel = open_channel(address, security=security, expect=ROUTER)
    try:
        async with channel.request(
            HEARTBEAT,
            Cardinality.UNARY_UNARY,
            control_pb2.SidecarHeartbeatRequest,
            control_pb2.SidecarHeartbeatResponse,
        ) as stream:
            await stream.send_message(control_pb2.SidecarHeartbeatRequest(sidecar_id=sidecar_id), end=True)
            await stream.recv_message()
    finally:
        channel.close()


async def push(address: str, security: Security) -> None:
    channel = open_channel(address, security=security, expect=SIDECAR)
    try:
        async with channel.request(
            PUSH, Cardinality.STREAM_STREAM, dataplane_pb2.PushFrame, dataplane_pb2.PushReply
        ) as stream:
            await stream.send_message(
                dataplane_pb2.PushFrame(open=dataplane_pb2.PushOpen(source="s")), end=True
            )
            await stream.recv_message()
    finally:
        channel.close()


def test_request_dependent_rules(tmp_path: Path) -> None:
    pki = TestPki(tmp_path)

    async def scenario() -> None:
        router = GrpcServer([Echo()], host="127.0.0.1", port=0, security=server_security(pki, "router", "r0"))
        sidecar = GrpcServer(
            [Echo()], host="127.0.0.1", port=0, security=server_security(pki, "sidecar", "pod-a")
        )
        await router.start()
        await sidecar.start()
        try:
            a = pki.security("sidecar", "pod-a")
            await heartbeat(router.address, a, "pod-a")  # as itself: allowed
            with pytest.raises(GRPCError) as info:
                await heartbeat(router.address, a, "pod-b")
            assert info.value.status == Status.PERMISSION_DENIED and "'pod-b'" in (info.value.message or "")
            await push(sidecar.address, a)  # the pod's own identity pushes into its sidecar
            with pytest.raises(GRPCError) as info:
                await push(sidecar.address, pki.security("sidecar", "pod-b"))
            assert info.value.status == Status.PERMISSION_DENIED
            await push(
                sidecar.address, pki.security("user", "ingest", ("editor",))
            )  # or a person with editor
            # The client checks who answered: a sidecar is not a router.
            with pytest.raises(Exception, match="expected a router"):
                await heartbeat(sidecar.address, a, "pod-a")
        finally:
            await router.stop()
            await sidecar.stop()

    asyncio.run(scenario())


def test_connections_per_peer_are_capped(tmp_path: Path) -> None:
    pki = TestPki(tmp_path)

    async def scenario() -> None:
        security = server_security(pki, "router", "r0", max_connections_per_peer=2)
        server = GrpcServer([Echo()], host="127.0.0.1", port=0, security=security)
        await server.start()
        a = pki.security("sidecar", "pod-a")
        channels = [open_channel(server.address, security=a, expect=ROUTER) for _ in range(3)]
        try:
            results = []
            for channel in channels:  # one at a time: each opens its own connection and keeps it
                try:
                    async with channel.request(
                        HEARTBEAT,
                        Cardinality.UNARY_UNARY,
                        control_pb2.SidecarHeartbeatRequest,
                        control_pb2.SidecarHeartbeatResponse,
                    ) as stream:
                        await stream.send_message(
                            control_pb2.SidecarHeartbeatRequest(sidecar_id="pod-a"), end=True
                        )
                        await stream.recv_message()
                    results.append("ok")
                except (StreamTerminatedError, ConnectionError, OSError):
                    results.append("refused")
            assert results == ["ok", "ok", "refused"]
            # Another identity is counted on its own.
            await heartbeat(server.address, pki.security("sidecar", "pod-b"), "pod-b")
        finally:
            for channel in channels:
                channel.close()
            await server.stop()

    asyncio.run(scenario())


def test_a_silent_connection_is_closed_at_the_handshake_timeout(tmp_path: Path) -> None:
    """Neither listener keeps a connection that never finishes its TLS handshake."""
    from aiohttp import web

    from etlrouter.core.http import HttpServer

    pki = TestPki(tmp_path)

    async def closed_after(port: int) -> float:
        started = asyncio.get_running_loop().time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server, nothing sent
        finally:
            writer.close()
        return asyncio.get_running_loop().time() - started

    async def scenario() -> None:
        security = server_security(pki, "router", "r0", handshake_timeout_ms=500)
        grpc = GrpcServer([Echo()], host="127.0.0.1", port=0, security=security)
        http = HttpServer(
            web.Application(),
            host="127.0.0.1",
            port=0,
            ssl_context=security.http_server_context(),
            handshake_timeout_s=0.5,
        )
        await grpc.start()
        await http.start()
        try:
            for port in (grpc.port, http.port):
                assert 0.4 <= await closed_after(port) < 5
        finally:
            await grpc.stop()
            await http.stop()

    asyncio.run(scenario())
