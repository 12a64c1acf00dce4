"""filter and map transforms, lookup-file, stdout sink over gRPC; the connector registry."""

from __future__ import annotations

import io
import json
from pathlib import Path

import msgspec
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from etlrouter._proto.v1 import records_pb2, services_grpc, services_pb2
from etlrouter.connectors import CONNECTORS
from etlrouter.connectors.expr import ExpressionError
from etlrouter.connectors.filter import FilterTransform
from etlrouter.connectors.lookup_file import FileLookup, LookupFileError
from etlrouter.connectors.map import MapTransform
from etlrouter.connectors.stdout import StdoutSink
from etlrouter.sdk import Record, serving
from tests.sdk.grpc_helpers import channel_to, flush, process, write


def order(offset: int, amount: float, country: str) -> Record:
    return Record(
        b"", msgspec.json.encode({"amount": amount, "country": country}), {"country": country}, 0, offset
    )


async def test_filter_keeps_matching_records_and_reports_bad_ones() -> None:
    inputs = [order(0, 5, "DE"), order(1, 50, "DE"), order(2, 50, "FR"), Record(b"", b"oops", {}, 0, 3)]
    service = FilterTransform('value.amount > 10 and headers.country == "DE"')
    async with serving(service) as host, channel_to(host.address) as channel:
        kept, errors = await process(channel, inputs)
        by_option, _ = await process(channel, inputs[:3], {"expr": "headers.country == 'FR'"})
    assert kept == [inputs[1]]
    assert [(e.index, e.error_class) for e in errors] == [(3, records_pb2.ERROR_CLASS_PERMANENT)]
    assert "value is not valid JSON" in errors[0].message
    assert by_option == [inputs[2]]


async def test_a_bad_expression_in_the_stage_options_is_invalid_argument_naming_the_column() -> None:
    async with serving(FilterTransform()) as host, channel_to(host.address) as channel:
        with pytest.raises(GRPCError) as bad:
            await process(channel, [order(0, 1, "DE")], {"expr": "value.amount >"})
        with pytest.raises(GRPCError) as missing:
            await process(channel, [order(0, 1, "DE")])
    assert bad.value.status == Status.INVALID_ARGUMENT
    assert bad.value.message == (
        "ProcessBatch: options.expr: column 15: expected a value after '>', found end of input "
        "(in 'value.amount >')"
    )
    assert missing.value.status == Status.INVALID_ARGUMENT
    assert "no filter expression" in str(missing.value.message)


def test_a_bad_default_expression_fails_at_construction() -> None:
    with pytest.raises(ExpressionError, match="column 7"):
        FilterTransform("value.")
    with pytest.raises(ExpressionError, match="column 1"):
        MapTransform("offset = 1")


async def test_map_rewrites_records_and_reports_failures_by_index() -> None:
    program = "value.total = value.amount * 2; headers.country = lower(value.country); del value.country"
    inputs = [order(0, 5, "DE"), Record(b"", b"[1]", {}, 0, 1), order(2, 1.5, "FR")]
    async with serving(MapTransform(program)) as host, channel_to(host.address) as channel:
        output, errors = await process(channel, inputs)
    assert [msgspec.json.decode(r.value) for r in output] == [
        {"amount": 5, "total": 10},
        {"amount": 1.5, "total": 3.0},
    ]
    assert [r.headers for r in output] == [{"country": "de"}, {"country": "fr"}]
    assert [r.offset for r in output] == [0, 2]
    assert [(e.index, e.error_class) for e in errors] == [(1, records_pb2.ERROR_CLASS_PERMANENT)]
    assert errors[0].message.startswith("map: column ")


async def test_lookup_file_csv_hits_and_misses(tmp_path: Path) -> None:
    path = tmp_path / "customers.csv"
    path.write_text("id,name,tier\nc1,Ada,gold\nc2,Bob,silver\n")
    async with serving(FileLookup(path, "id")) as host, channel_to(host.address) as channel:
        stub = services_grpc.LookupServiceStub(channel)
        hit = (await stub.Lookup(services_pb2.LookupRequest(key=b"c2"))).result
        miss = (await stub.Lookup(services_pb2.LookupRequest(key=b"c9"))).result
        many = (await stub.BatchLookup(services_pb2.BatchLookupRequest(keys=[b"c9", b"c1", b"c2"]))).results
    assert hit.found and dict(hit.fields) == {"id": "c2", "name": "Bob", "tier": "silver"}
    assert json.loads(hit.value) == {"id": "c2", "name": "Bob", "tier": "silver"}
    assert not miss.found
    assert [(r.found, r.fields.get("name")) for r in many] == [(False, None), (True, "Ada"), (True, "Bob")]


async def test_lookup_file_json_array_and_json_lines(tmp_path: Path) -> None:
    array = tmp_path / "a.json"
    array.write_text('[{"sku": 1, "price": 9.5, "tags": ["x"]}, {"sku": 2, "price": null}]')
    lines = tmp_path / "b.jsonl"
    lines.write_text('{"sku": "s1", "ok": true}\n\n{"sku": "s2", "ok": false}\n')
    array_lookup, lines_lookup = FileLookup(array, "sku"), FileLookup(lines, "sku")
    assert (await array_lookup.lookup(b"1")) is not None
    result = await array_lookup.lookup(b"1")
    assert result is not None and result.fields == {"sku": "1", "price": "9.5", "tags": '["x"]'}
    second = await array_lookup.lookup(b"2")
    assert second is not None and second.fields == {"sku": "2"}  # null fields are left out
    assert [r is not None for r in await lines_lookup.batch_lookup([b"s2", b"s3"])] == [True, False]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("x.csv", "name\nAda\n", "row 1 has no key column 'id'"),
        ("x.json", "[1, 2]", "element 1 of the array is not an object"),
        ("x.jsonl", '{"id": 1}\n{"id": \n', "x.jsonl:2: not valid JSON"),
    ],
)
def test_lookup_file_errors_name_the_row(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(LookupFileError, match=message):
        FileLookup(path, "id")


async def test_stdout_sink_prints_one_line_per_record() -> None:
    out = io.StringIO()
    records = [Record(b"k", b"hello", {"b": "2", "a": "1"}, 5, 1), Record(b"", b"\xff", {}, 0, 2)]
    async with serving(StdoutSink(out=out)) as host, channel_to(host.address) as channel:
        response = await write(channel, "b-9", records)
        await flush(channel)
    assert response.written == 2
    assert out.getvalue().splitlines() == [
        "[b-9] offset=1 time=5 key=k value=hello a=1 b=2",
        "[b-9] offset=2 time=0 key= value=\\xff",
    ]


def test_registry_names_every_connector_and_each_main_parses_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(CONNECTORS) == {
        *("generator", "jsonl-file-source", "jsonl-file-sink", "filter", "map", "lookup-file", "stdout"),
        *("postgres", "redis-streams", "http-ingest"),
        *("kafka-source", "kafka-sink", "s3", "clickhouse", "nats-source", "nats-sink"),
    }
    for name, main in CONNECTORS.items():
        with pytest.raises(SystemExit) as exit_:
            main(["--help"])
        assert exit_.value.code == 0, name
        assert "--port" in capsys.readouterr().out, name


def test_a_bad_expression_on_the_command_line_exits_with_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        CONNECTORS["filter"](["--expr", "value.a >", "--port", "0"])
    assert exit_.value.code == 2
    assert "column 10: expected a value after '>'" in capsys.readouterr().err
