"""Versioned msgpack blobs: the one rule for reading bytes that carry a `format_version` field.

Log entries (`CommandEnvelope`) and control-state snapshots (`ControlSnapshot`) are msgspec structs with a
`format_version`. Reading one is always the same: read the version alone (so a blob from a newer node is
recognised before its body is decoded), pick the struct of that version, decode it, and turn whatever is
wrong into one error of the caller's type with a message that says what. The messages end up in replicated
results, so they depend on the bytes alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, TypeVar

import msgspec

T = TypeVar("T")


class _VersionProbe(msgspec.Struct):
    """Reads only the version; UNSET when the blob has none (it is then read as the current version)."""

    format_version: int | msgspec.UnsetType = msgspec.UNSET


_probe_decoder = msgspec.msgpack.Decoder(_VersionProbe)
_encoder = msgspec.msgpack.Encoder()


class VersionedCodec(Generic[T]):
    """Encodes and decodes one kind of versioned blob.

    `versions` maps each readable version onto its struct; the highest one is current. `what` names the
    blob in messages ("snapshot": "malformed snapshot: ..."), `not_this` is the message for bytes that are
    not such a blob at all ("not a control-state snapshot"), `error` the exception raised for every problem.
    """

    def __init__(
        self,
        versions: Mapping[int, type[T]],
        *,
        what: str,
        not_this: str,
        error: type[ValueError],
    ) -> None:
        if not versions:
            raise ValueError("a versioned codec needs at least one version")
        self.current = max(versions)
        self.what = what
        self.not_this = not_this
        self.error = error
        self._decoders = {version: msgspec.msgpack.Decoder(struct) for version, struct in versions.items()}
        self._readable = ", ".join(str(version) for version in sorted(versions))

    def encode(self, value: T) -> bytes:
        return _encoder.encode(value)

    def decode(self, data: bytes) -> T:
        """Decode `data`; raise `error` naming what is wrong with it."""
        try:
            version = _probe_decoder.decode(data).format_version
        except msgspec.DecodeError as error:
            raise self.error(f"{self.not_this}: {error}") from None
        if version is msgspec.UNSET:
            version = self.current
        decoder = self._decoders.get(version)
        if decoder is None:
            raise self.error(
                f"{self.what} format version {version} is not supported (this node reads {self._readable})"
            )
        try:
            return decoder.decode(data)
        except msgspec.DecodeError as error:
            raise self.error(f"malformed {self.what}: {error}") from None
