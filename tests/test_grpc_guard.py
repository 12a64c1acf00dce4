"""In-process: a malformed request is INVALID_ARGUMENT, logged once per method without a traceback."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError

from etlrouter.core import grpc as grpc_module
from etlrouter.core.grpc import GrpcServer
from etlrouter.core.metrics import REGISTRY

CHECK = "/grpc.health.v1.Health/Check"


class RawCodec(CodecBase):
    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


async def call(port: int, data: bytes) -> GRPCError | None:
    channel = Channel("127.0.0.1", port, codec=RawCodec())
    try:
        async with channel.request(CHECK, Cardinality.UNARY_UNARY, bytes, bytes, timeout=5) as stream:
            await stream.send_message(data, end=True)
            await stream.recv_message()
    except GRPCError as error:
        return error
    finally:
        channel.close()
    return None


def refused_total() -> float:
    return REGISTRY.get_sample_value("etlrouter_grpc_malformed_requests_total", {"method": CHECK}) or 0.0


def test_malformed_requests_are_refused_and_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grpc_module, "_malformed_log", grpc_module._MalformedLog())  # a fresh rate limit

    async def scenario() -> list[GRPCError | None]:
        server = GrpcServer([], host="127.0.0.1", port=0)
        await server.start()
        try:
            return [await call(server.port, b"\x0a\x40abc") for _ in range(3)] + [
                await call(server.port, b"")
            ]
        finally:
            await server.stop()

    before = refused_total()
    with caplog.at_level(logging.DEBUG):
        *bad, good = asyncio.run(scenario())
    for error in bad:
        assert error is not None and error.status is Status.INVALID_ARGUMENT
        assert (error.message or "").startswith("malformed grpc.health.v1.HealthCheckRequest: ")
    assert good is None  # an empty message is a valid (default) request
    assert refused_total() - before == 3
    warnings = [r for r in caplog.records if "malformed request refused" in r.getMessage()]
    (warning,) = warnings  # the later ones fall within the minute: counted, not logged
    assert warning.levelno == logging.WARNING and warning.exc_info is None
    assert warning.fields["method"] == CHECK
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
