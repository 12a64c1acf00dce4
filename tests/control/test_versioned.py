"""VersionedCodec: the version is read first and picks the struct; every problem is one named error."""

from __future__ import annotations

import msgspec
import pytest

from etlrouter.control.versioned import VersionedCodec


class V1(msgspec.Struct, frozen=True, kw_only=True):
    format_version: int = 1
    name: str


class V2(msgspec.Struct, frozen=True, kw_only=True):
    format_version: int = 2
    names: tuple[str, ...]


class BlobError(ValueError):
    pass


CODEC: VersionedCodec[V1 | V2] = VersionedCodec(
    {1: V1, 2: V2}, what="blob", not_this="not a blob", error=BlobError
)


def test_the_version_picks_the_struct_and_encoding_round_trips() -> None:
    assert CODEC.current == 2
    assert CODEC.decode(CODEC.encode(V1(name="a"))) == V1(name="a")
    assert CODEC.decode(CODEC.encode(V2(names=("a", "b")))) == V2(names=("a", "b"))


def test_a_blob_without_a_version_is_read_as_the_current_one() -> None:
    assert CODEC.decode(msgspec.msgpack.encode({"names": ["x"]})) == V2(names=("x",))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a blob: "),
        (msgspec.msgpack.encode([1]), "not a blob: "),
        (msgspec.msgpack.encode({"format_version": "1"}), "not a blob: "),
        (
            msgspec.msgpack.encode({"format_version": 3}),
            "blob format version 3 is not supported (this node reads 1, 2)",
        ),
        (msgspec.msgpack.encode({"format_version": 1}), "malformed blob: "),
    ],
)
def test_bad_bytes_raise_the_callers_error_naming_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(BlobError) as raised:
        CODEC.decode(data)
    assert str(raised.value).startswith(message)


def test_a_codec_needs_a_version() -> None:
    with pytest.raises(ValueError, match="at least one version"):
        VersionedCodec({}, what="blob", not_this="not a blob", error=BlobError)
