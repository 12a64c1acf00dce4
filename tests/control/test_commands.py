"""Command encoding: every command survives the log byte for byte; bad bytes are named."""

from __future__ import annotations

import msgspec
import pytest

from etlrouter.control import (
    ApplyPipelines,
    AssignStages,
    ClientSession,
    Command,
    CommandDecodeError,
    DeletePipeline,
    DeregisterService,
    DeregisterSidecar,
    RegisterService,
    RegisterSidecar,
    ReplicaAssignment,
    ReplicaKey,
    Restore,
    RevokeStages,
    ServiceInstance,
    decode_command,
    encode_command,
)

EXAMPLES: list[Command] = [
    RegisterService(instance=ServiceInstance(name="geo", kind="lookup", labels={"a": "b"}), ttl_ms=5),
    DeregisterService(instance_id="geo@3"),
    RegisterSidecar(
        sidecar_id="s",
        data_address="s:1",
        services=(ServiceInstance(name="k", kind="source", capabilities=b"\x01\x02"),),
        labels={"zone": "a"},
        version="1.2",
    ),
    DeregisterSidecar(sidecar_id="s", reason="expired"),
    ApplyPipelines(
        definition="pipeline p { source k | sink c }", filename="p.etl", prune=True, mode="update"
    ),
    DeletePipeline(name="p", expected_generation=3),
    AssignStages(assignments=(ReplicaAssignment("d", "st", 1, "s"), ReplicaAssignment("d", "st", 0, ""))),
    RevokeStages(replicas=(ReplicaKey("d", "st", 0),)),
    Restore(snapshot=b"\x00snap"),
]


@pytest.mark.parametrize("command", EXAMPLES, ids=lambda command: type(command).__name__)
def test_every_command_round_trips(command: Command) -> None:
    data = encode_command(command, ClientSession("c", 4))
    envelope = decode_command(data)
    assert envelope.command == command and envelope.session == ClientSession("c", 4)
    assert encode_command(envelope.command, envelope.session) == data


def test_the_type_tag_names_the_command() -> None:
    raw = msgspec.msgpack.decode(encode_command(DeletePipeline(name="p")))
    assert raw["command"]["type"] == "delete_pipeline" and raw["format_version"] == 1


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "not a command envelope"),
        (msgspec.msgpack.encode({"format_version": 99}), "format version 99 is not supported"),
        (msgspec.msgpack.encode({"command": {"type": "launch_missiles"}}), "malformed command"),
        (msgspec.msgpack.encode({"command": {"type": "delete_pipeline", "name": 5}}), "$.command.name"),
    ],
)
def test_bad_entries_raise_a_named_decode_error(data: bytes, needle: str) -> None:
    with pytest.raises(CommandDecodeError) as caught:
        decode_command(data)
    assert needle in str(caught.value)
