"""grpclib/h2 tuning and limits, applied in one place for every server and client of the process.

Two measured costs (docs/adr/0002-transport-tuning.md, benchmarks/transport.py):
- h2 calls `repr(frame)` for every received frame to pass it to a trace logger that is a no-op unless
  tracing is on. For a DATA frame that repr serializes the body and hexlifies it: a copy plus a hex pass
  over every byte received. We give DATA frames a constant-cost repr.
- h2 advertises the RFC's 16 KiB SETTINGS_MAX_FRAME_SIZE, so a 300 KB batch arrives as ~19 frames, each
  paying h2's per-frame Python overhead. We advertise 1 MiB (peers may then send frames up to that size).

And one safety limit grpclib lacks: a maximum message size, checked from the 5-byte gRPC message prefix
before any of the message is buffered, so a peer cannot make us allocate an arbitrary amount of memory.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, TypeVar

import grpclib.client
import grpclib.protocol
import grpclib.server
import h2.connection
import h2.settings
import hyperframe.frame
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.exceptions import GRPCError

if TYPE_CHECKING:
    from grpclib.encoding.base import CodecBase
    from grpclib.protocol import Stream

    from etlrouter.core.config import TransportConfig

_T = TypeVar("_T")
_original_data_body_repr = hyperframe.frame.DataFrame._body_repr
_original_h2_connection = h2.connection.H2Connection
_max_message_bytes = 64 << 20


def _cheap_data_body_repr(self: hyperframe.frame.DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


def _tuned_connection_class(max_frame_size: int) -> type[h2.connection.H2Connection]:
    class TunedH2Connection(_original_h2_connection):
        def __init__(self, config: Any = None) -> None:
            super().__init__(config=config)
            self.local_settings = h2.settings.Settings(
                client=self.config.client_side,
                initial_values={
                    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100,
                    h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.DEFAULT_MAX_HEADER_LIST_SIZE,
                    h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame_size,
                },
            )
            # Accept large frames at once: a peer may use our setting as soon as it has read it, before
            # we receive its acknowledgement.
            self.max_inbound_frame_size = max_frame_size

    return TunedH2Connection


async def _bounded_recv_message(stream: Stream, codec: CodecBase, message_type: type[_T]) -> _T | None:
    meta = await stream.recv_data(5)
    if not meta:
        return None
    compressed, length = struct.unpack(">?I", meta)
    if compressed:
        raise GRPCError(Status.UNIMPLEMENTED, "compressed gRPC messages are not supported")
    if length > _max_message_bytes:
        raise GRPCError(
            Status.RESOURCE_EXHAUSTED,
            f"message of {length} bytes exceeds the {_max_message_bytes} byte limit "
            "(transport.max_message_bytes)",
        )
    data = await stream.recv_data(length)
    if len(data) != length:
        raise GRPCError(Status.INTERNAL, f"stream ended inside a message ({len(data)} of {length} bytes)")
    return codec.decode(data, message_type)  # type: ignore[no-any-return]


def install(config: TransportConfig) -> None:
    """Apply the process-wide transport settings. Call before creating servers or channels."""
    global _max_message_bytes
    _max_message_bytes = config.max_message_bytes
    # grpclib imports recv_message by name into both modules; replace it where it is looked up.
    setattr(grpclib.server, "recv_message", _bounded_recv_message)  # noqa: B010
    setattr(grpclib.client, "recv_message", _bounded_recv_message)  # noqa: B010
    tuned = config.h2_tuning
    body_repr = _cheap_data_body_repr if tuned else _original_data_body_repr
    setattr(hyperframe.frame.DataFrame, "_body_repr", body_repr)  # noqa: B010
    connection_class = _tuned_connection_class(config.max_frame_size) if tuned else _original_h2_connection
    setattr(grpclib.protocol, "H2Connection", connection_class)  # noqa: B010


def grpc_configuration(config: TransportConfig) -> Configuration:
    """grpclib flow-control windows: large enough that one window holds several batches."""
    if not config.h2_tuning:
        return Configuration()
    return Configuration(
        http2_connection_window_size=config.connection_window_bytes,
        http2_stream_window_size=config.stream_window_bytes,
    )
