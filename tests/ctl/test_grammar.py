"""One grammar for every ctl verb (#22): the global options go before or after the verb (or between a group
and its verb) with the same result, and every verb answers `-o json` / `-o yaml` with data.

The verbs are enumerated from the click group, so a new verb fails here until it has sample arguments
below. The cluster is a stand-in that answers every admin call with canned protobuf replies, so the test is
about the command line, not the cluster (tests/integration/test_ctl_e2e.py runs ctl against real routers).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner
from google.protobuf import json_format

from etlrouter._proto.v1 import admin_grpc, admin_pb2, dataplane_grpc, dataplane_pb2
from etlrouter.cli import cli
from etlrouter.ctl import cli as ctl_cli
from tests.conftest import ROOT

EXAMPLE = str(ROOT / "examples" / "pipelines.etl")

PIPELINE = {
    "name": "p",
    "phase": "PIPELINE_PHASE_RUNNING",
    "dagId": "d1",
    "stageIds": ["s1"],
    "generation": 1,
}
STATUS = {
    "nodeId": "r0",
    "leaderId": "r0",
    "leaderAddress": "127.0.0.1:1",
    "term": 2,
    "commitIndex": 9,
    "appliedIndex": 9,
    "members": [{"id": "r0", "address": "127.0.0.1:1", "voter": True, "leader": True, "matchIndex": 9}],
}
REPLIES: dict[str, tuple[type, dict[str, Any]]] = {
    "ApplyPipelines": (admin_pb2.ApplyPipelinesResponse, {"changes": [{"name": "p", "action": 1}]}),
    "GetPipeline": (admin_pb2.PipelineResponse, {"pipeline": PIPELINE}),
    "ListPipelines": (
        admin_pb2.ListPipelinesResponse,
        {
            "pipelines": [PIPELINE],
            "dags": [
                {"id": "d1", "stages": [{"id": "s1", "kind": 1, "service": "orders", "pipelines": ["p"]}]}
            ],
        },
    ),
    "DeletePipeline": (admin_pb2.DeletePipelineResponse, {"revision": 3}),
    "ListServices": (admin_pb2.ListServicesResponse, {"services": [{"name": "orders", "kind": 1}]}),
    "ListSidecars": (
        admin_pb2.ListSidecarsResponse,
        {
            "sidecars": [
                {"sidecarId": "sc", "dataAddress": "127.0.0.1:2", "health": 1, "stages": [{"stageId": "s1"}]}
            ]
        },
    ),
    "GetClusterStatus": (admin_pb2.ClusterStatus, STATUS),
    "AddMember": (admin_pb2.ClusterStatus, STATUS),
    "RemoveMember": (admin_pb2.ClusterStatus, STATUS),
    "TransferLeadership": (admin_pb2.ClusterStatus, STATUS),
}
LETTER = dataplane_pb2.DeadLetter(id="L1", pipeline="p", stage_id="s1", error_class=2, reason="error")
SNAPSHOT = b"state"


class FakeClient:
    def __init__(self, addresses: list[str], **_: Any) -> None:
        self.timeout = 1.0

    async def call(self, stub_class: type, method: str, request: Any, **_: Any) -> Any:
        message_type, data = REPLIES[method]
        return json_format.ParseDict(data, message_type())

    def channel(self, address: str, expect: object = None) -> object:
        return object()

    def close(self) -> None:
        pass


class FakeStream:
    async def __aenter__(self) -> FakeStream:
        return self

    async def __aexit__(self, *_: object) -> None:
        pass

    async def send_message(self, message: Any, end: bool = False) -> None:
        pass

    async def __aiter__(self) -> Any:
        yield dataplane_pb2.TapEvent(record={"offset": 7, "key": b"k", "value": b'{"a": 1}'})


class FakeTap:
    def open(self) -> FakeStream:
        return FakeStream()


class FakeSidecarAdmin:
    def __init__(self, channel: object) -> None:
        self.Tap = FakeTap()

    async def ListDeadLetters(self, request: Any, timeout: float) -> Any:
        return dataplane_pb2.ListDeadLettersResponse(dead_letters=[LETTER])

    async def GetDeadLetter(self, request: Any, timeout: float) -> Any:
        return LETTER

    async def RedriveDeadLetters(self, request: Any, timeout: float) -> Any:
        return dataplane_pb2.RedriveDeadLettersResponse(redriven=1)


class FakeBackup:
    def __init__(self, channel: object) -> None:
        pass

    async def CreateSnapshot(self, request: Any, timeout: float) -> Any:
        info = admin_pb2.SnapshotInfo(index=9, term=2, size=len(SNAPSHOT))
        return [admin_pb2.SnapshotChunk(info=info, data=SNAPSHOT, last=True, crc32=zlib.crc32(SNAPSHOT))]

    async def RestoreSnapshot(self, chunks: Any, timeout: float) -> Any:
        return admin_pb2.RestoreSnapshotResponse(index=9, pipelines=1, services=1)


def sample_args(tmp: Path) -> dict[str, list[str]]:
    snapshot = tmp / "state.snap"
    snapshot.write_bytes(SNAPSHOT)
    return {
        "validate": ["-f", EXAMPLE],
        "explain": ["-f", EXAMPLE],
        "apply": ["-f", EXAMPLE],
        "list": [],
        "get": ["p"],
        "describe": ["p"],
        "delete": ["p"],
        "services": [],
        "sidecars": [],
        "cluster status": [],
        "cluster add-member": ["r3", "127.0.0.1:9"],
        "cluster remove-member": ["r3"],
        "cluster transfer-leader": [],
        "backup create": ["-f", str(tmp / "out.snap")],
        "backup restore": ["-f", str(snapshot)],
        "dlq list": [],
        "dlq show": ["L1"],
        "dlq redrive": ["L1"],
        "tap": ["p", "orders", "--limit", "1"],
    }


def verbs(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from verbs(command, (*prefix, name))
        else:
            yield (*prefix, name)


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    monkeypatch.setattr(ctl_cli, "RouterClient", FakeClient)
    monkeypatch.setattr(dataplane_grpc, "SidecarAdminStub", FakeSidecarAdmin)
    monkeypatch.setattr(admin_grpc, "BackupServiceStub", FakeBackup)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config-home"))
    monkeypatch.delenv("ETLROUTER_CTL__OUTPUT", raising=False)
    return CliRunner()


def parse_json(text: str, verb: str) -> Any:
    if verb == "tap":  # JSON Lines: one object per record
        return [json.loads(line) for line in text.splitlines()]
    return json.loads(text)


def test_every_verb_has_sample_arguments(tmp_path: Path) -> None:
    assert sorted(" ".join(v) for v in verbs(ctl_cli.ctl)) == sorted(sample_args(tmp_path))


@pytest.mark.parametrize("verb", [" ".join(v) for v in verbs(ctl_cli.ctl)])
def test_output_option_before_or_after_the_verb_gives_the_same_json(
    runner: CliRunner, tmp_path: Path, verb: str
) -> None:
    path = verb.split()
    args = sample_args(tmp_path)[verb]
    placements = [
        ["ctl", "-o", "json", *path, *args],
        ["ctl", *path, *args, "-o", "json"],
        ["ctl", *path, "-o", "json", *args],
    ]
    if len(path) > 1:
        placements.append(["ctl", path[0], "-o", "json", *path[1:], *args])
    outputs = []
    for argv in placements:
        result = runner.invoke(cli, argv)
        assert result.exit_code == 0, (argv, result.output, result.exception)
        outputs.append(parse_json(result.stdout, verb))
    assert all(out == outputs[0] for out in outputs), outputs

    as_yaml = runner.invoke(cli, ["ctl", *path, *args, "--output", "yaml"])
    assert as_yaml.exit_code == 0, as_yaml.output
    documents = [d for d in yaml.safe_load_all(as_yaml.stdout) if d is not None]
    assert documents == (outputs[0] if verb == "tap" else [outputs[0]])
    table = runner.invoke(cli, ["ctl", *path, *args])
    assert table.exit_code == 0 and table.stdout.strip(), table.output


def test_router_option_after_the_verb_is_used(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    class Recording(FakeClient):
        def __init__(self, addresses: list[str], **kw: Any) -> None:
            seen.append(list(addresses))
            super().__init__(addresses, **kw)

    monkeypatch.setattr(ctl_cli, "RouterClient", Recording)
    assert runner.invoke(cli, ["ctl", "list", "--router", "10.0.0.1:7400"]).exit_code == 0
    assert runner.invoke(cli, ["ctl", "--router", "10.0.0.2:7400", "cluster", "status"]).exit_code == 0
    assert seen == [["10.0.0.1:7400"], ["10.0.0.2:7400"]]


def test_enum_values_are_spelt_as_graphql_spells_them(runner: CliRunner) -> None:
    schema = (ROOT / "src" / "etlrouter" / "api" / "static" / "schema.graphql").read_text()
    (pipeline,) = json.loads(runner.invoke(cli, ["ctl", "list", "-o", "json"]).stdout)
    (service,) = json.loads(runner.invoke(cli, ["ctl", "services", "-o", "json"]).stdout)
    (sidecar,) = json.loads(runner.invoke(cli, ["ctl", "sidecars", "-o", "json"]).stdout)
    for value in (pipeline["phase"], service["kind"], sidecar["health"]):
        assert f"\n  {value}\n" in schema, value


def test_a_positional_file_is_still_accepted(runner: CliRunner) -> None:
    assert runner.invoke(cli, ["ctl", "validate", EXAMPLE]).exit_code == 0
    assert runner.invoke(cli, ["ctl", "apply", EXAMPLE, "-o", "json"]).exit_code == 0
    both = runner.invoke(cli, ["ctl", "validate", EXAMPLE, "-f", str(Path(EXAMPLE).with_name("x.etl"))])
    assert both.exit_code == 2 and "two files" in both.output


def test_apply_validates_locally_before_contacting_any_cluster(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    class Unreachable(FakeClient):
        async def call(self, *args: Any, **kw: Any) -> Any:
            raise AssertionError("contacted the cluster for a broken file")

    monkeypatch.setattr(ctl_cli, "RouterClient", Unreachable)
    bad = tmp_path / "bad.etl"
    bad.write_text("pipeline p {\n  source a | transfrom b | sink c\n}\n")
    result = runner.invoke(cli, ["ctl", "apply", "-f", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}:2:14: error: " in result.output
