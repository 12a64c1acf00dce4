"""The complete examples in docs/sdk.md run: each is executed with `run` captured, then served and called."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import etlrouter.sdk
from etlrouter._proto.v1 import services_grpc, services_pb2
from etlrouter.sdk import Record, Service, serving
from tests.conftest import ROOT
from tests.sdk.grpc_helpers import ack, channel_to, process, pull, write

DOC = ROOT / "docs" / "sdk.md"


def examples() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    return [block for block in blocks if "run(" in block and "class " in block]


def load(code: str, monkeypatch: pytest.MonkeyPatch) -> Service:
    captured: list[Service] = []

    def fake_run(*services: Service, **_: Any) -> None:
        captured.extend(services)

    monkeypatch.setattr(etlrouter.sdk, "run", fake_run)
    exec(compile(code, str(DOC), "exec"), {"__name__": "__main__"})
    assert len(captured) == 1
    return captured[0]


def test_the_guide_has_one_example_per_kind() -> None:
    kinds = {re.search(r"class \w+\((\w+)\)", block).group(1) for block in examples()}  # type: ignore[union-attr]
    assert kinds == {"Source", "RecordTransform", "Sink", "Lookup"}


@pytest.mark.parametrize("code", examples(), ids=lambda code: code.split("class ")[1].split("(")[0])
async def test_example_serves_and_answers(code: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    service = load(code, monkeypatch)
    async with serving(service) as host, channel_to(host.address) as channel:
        if isinstance(service, etlrouter.sdk.Source):
            response = await pull(channel, 3)
            assert response.batch.header.record_count == 3
            await ack(channel, 0, response.batch.header.last_offset)
        elif isinstance(service, etlrouter.sdk.Transform):
            output, errors = await process(channel, [Record(value=b"abc"), Record(value=b"")])
            assert [r.value for r in output] == [b"ABC"]
            assert [e.index for e in errors] == [1]
        elif isinstance(service, etlrouter.sdk.Sink):
            first = await write(channel, "b1", [Record(value=b"x"), Record(value=b"")])
            again = await write(channel, "b1", [Record(value=b"x"), Record(value=b"")])
            await services_grpc.SinkServiceStub(channel).Flush(services_pb2.FlushRequest())
            assert (first.written, len(first.errors), again.written) == (1, 1, 2)
        else:
            stub = services_grpc.LookupServiceStub(channel)
            hit = await stub.Lookup(services_pb2.LookupRequest(key=b"DE"))
            assert hit.result.found and hit.result.fields["name"] == "Germany"
