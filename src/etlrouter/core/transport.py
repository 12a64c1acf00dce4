"""grpclib/h2 tuning and limits, applied in one place for every server and client of the process.

Two measured costs (docs/adr/0002-transport-tuning.md, benchmarks/transport.py):
- h2 calls `repr(frame)` for every received frame to pass it to a trace logger that is a no-op unless
  tracing is on. For a DATA frame that repr serializes the body and hexlifies it: a copy plus a hex pass
  over every byte received. We give DATA frames a constant-cost repr.
- h2 advertises the RFC's 16 KiB SETTINGS_MAX_FRAME_SIZE, so a 300 KB batch arrives as ~19 frames, each
  paying h2's per-frame Python overhead. We advertise 1 MiB (peers may then send frames up to that size).
- Sending a message, grpclib prepends the 5-byte gRPC prefix by concatenation, then h2 copies the body
  into the frame, the frame into its outbound buffer and the buffer into the bytes handed to the socket:
  four copies of every batch sent. The tuned path hands the prefix, the encoded message and a 9-byte frame
  header to the transport as they are (`writelines`), doing h2's flow-control and stream bookkeeping.

And one safety limit grpclib lacks: a maximum message size, checked from the 5-byte gRPC message prefix
before any of the message is buffered, so a peer cannot make us allocate an arbitrary amount of memory.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpclib.client
import grpclib.protocol
import grpclib.server
import grpclib.stream
import h2.connection
import h2.exceptions
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
_original_send_data = grpclib.protocol.Stream.send_data
_original_send_message = grpclib.stream.send_message
_max_message_bytes = 64 << 20
_MESSAGE_PREFIX = struct.Struct(">?I")  # compressed flag, length
_FRAME_HEADER = struct.Struct(">HBBBL")  # 24-bit length (high 16, low 8 bits), type, flags, stream id
_DATA, _END_STREAM = 0x0, 0x1
_JOIN_BELOW = 64 << 10  # frame bodies smaller than this are joined: the copy is cheaper than the writes
_Chunk = bytes | memoryview  # a piece of what goes on the wire


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
            self._chunks: list[_Chunk] = []  # what to write, in order, ahead of `_data_to_send`

        def send_data_parts(self, stream_id: int, parts: Sequence[_Chunk], end_stream: bool) -> None:
            """h2's `send_data` (without padding) for a frame body given in parts, which are queued as
            they are instead of being copied into one frame; `chunks_to_send` hands them out."""
            size = sum(len(part) for part in parts)
            if size > 0 and size > self.local_flow_control_window(stream_id):
                window = self.local_flow_control_window(stream_id)
                raise h2.exceptions.FlowControlError(
                    f"Cannot send {size} bytes, flow control window is {window}"
                )
            if size > self.max_outbound_frame_size:
                limit = self.max_outbound_frame_size
                raise h2.exceptions.FrameTooLargeError(f"Cannot send frame size {size}, max is {limit}")
            self.state_machine.process_input(h2.connection.ConnectionInputs.SEND_DATA)
            stream = self.streams[stream_id]
            # The stream's state machine (and END_STREAM) as for any DATA frame; its window by hand.
            (frame,) = stream.send_data(b"", end_stream)
            stream.outbound_flow_control_window -= size
            self.outbound_flow_control_window -= size
            flags = _END_STREAM if "END_STREAM" in frame.flags else 0
            if self._data_to_send:  # frames queued before this one go first
                self._chunks.append(bytes(self._data_to_send))
                self._data_to_send = bytearray()
            self._chunks.append(_FRAME_HEADER.pack(size >> 8, size & 0xFF, _DATA, flags, stream_id))
            self._chunks.extend(parts)

        def chunks_to_send(self) -> list[_Chunk]:
            """Everything queued to send, in order, as separate buffers (for `transport.writelines`)."""
            chunks, self._chunks = self._chunks, []
            if self._data_to_send:
                chunks.append(bytes(self._data_to_send))
                self._data_to_send = bytearray()
            return chunks

        def data_to_send(self, amount: int | None = None) -> bytes:
            if self._chunks:  # parts still queued: they come first, joined for a caller that wants bytes
                self._data_to_send = bytearray(b"".join(self.chunks_to_send()))
            return super().data_to_send(amount)

    return TunedH2Connection


def _parts_slice(parts: Sequence[_Chunk], start: int, size: int) -> list[_Chunk]:
    """The bytes [start, start + size) of the concatenated parts, as views (no copy)."""
    out: list[_Chunk] = []
    for part in parts:
        if size <= 0:
            break
        if start >= len(part):
            start -= len(part)
            continue
        piece = memoryview(part)[start : start + size]
        out.append(piece)
        size -= len(piece)
        start = 0
    return out


async def _send_parts(stream: Any, parts: Sequence[_Chunk], end_stream: bool) -> None:
    """grpclib's `Stream.send_data` (flow-control waits, frame-size splitting, sent-bytes accounting) for a
    body in parts, written without joining them. Any other H2Connection: grpclib's own way."""
    connection = stream._h2_connection
    if not hasattr(connection, "send_data_parts"):
        await _original_send_data(stream, b"".join(parts), end_stream=end_stream)
        return
    assert stream.id is not None
    total, sent = sum(len(part) for part in parts), 0
    while True:
        await stream.connection.write_ready.wait()
        window = connection.local_flow_control_window(stream.id)
        if not window > 0:  # may be negative
            stream.window_updated.clear()
            await stream.window_updated.wait()
            # other streams may have sent meanwhile: look at the window again
            continue
        size = min(window, connection.max_outbound_frame_size, total - sent)
        last = sent + size == total
        frame_parts = parts if size == total else _parts_slice(parts, sent, size)
        connection.send_data_parts(stream.id, frame_parts, end_stream=end_stream and last)
        chunks = connection.chunks_to_send()
        if size < _JOIN_BELOW:  # a small message: one write (one TLS record), as grpclib would
            stream._transport.write(b"".join(chunks))
        else:
            stream._transport.writelines(chunks)
        sent += size
        stream.data_sent += size
        stream.connection.data_sent += size
        stream.connection.data_send_process()
        if last:
            return


async def _send_data(self: Any, data: bytes, end_stream: bool = False) -> None:
    await _send_parts(self, (data,), end_stream)


async def _send_message(
    stream: Stream, codec: CodecBase, message: Any, message_type: Any, *, end: bool = False
) -> None:
    body = codec.encode(message, message_type)
    await _send_parts(stream, (_MESSAGE_PREFIX.pack(False, len(body)), body), end)


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
    # Messages go out as their parts (see above); grpclib imports send_message by name, like recv_message.
    send_message = _send_message if tuned else _original_send_message
    setattr(grpclib.server, "send_message", send_message)  # noqa: B010
    setattr(grpclib.client, "send_message", send_message)  # noqa: B010
    setattr(grpclib.protocol.Stream, "send_data", _send_data if tuned else _original_send_data)  # noqa: B010


def grpc_configuration(config: TransportConfig) -> Configuration:
    """grpclib flow-control windows: large enough that one window holds several batches."""
    if not config.h2_tuning:
        return Configuration()
    return Configuration(
        http2_connection_window_size=config.connection_window_bytes,
        http2_stream_window_size=config.stream_window_bytes,
    )
