"""A tiny replicated key-value state machine for Raft tests and benchmarks (not used by the product)."""

from __future__ import annotations

from typing import Any

import msgspec


class Put(msgspec.Struct, array_like=True):
    key: str
    value: str


class KV:
    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.applied: list[int] = []

    def apply(self, index: int, data: bytes) -> Any:
        put = msgspec.msgpack.decode(data, type=Put)
        self.data[put.key] = put.value
        self.applied.append(index)
        return index

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode(self.data)

    def restore(self, data: bytes) -> None:
        self.data = msgspec.msgpack.decode(data, type=dict[str, str]) if data else {}


def put(key: str, value: str) -> bytes:
    return msgspec.msgpack.encode(Put(key, value))
