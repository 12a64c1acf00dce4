"""The pure parts of `etlrouter dev`: the services a file declares, the port layout, the view."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from etlrouter._proto.v1 import admin_pb2, control_pb2
from etlrouter.connectors.generator import GeneratorConfig, make_record
from etlrouter.dev import layout, view
from etlrouter.dev.progress import PathStep, SinkFile, expected_offsets, generator_config
from etlrouter.dev.spec import ServiceSpec, SpecError, load_spec, parse_services, sample_text
from tests.conftest import ROOT


def test_the_example_file_is_the_packaged_sample_and_declares_four_services() -> None:
    assert (ROOT / "examples" / "dev.etl").read_text() == sample_text()
    spec = load_spec()
    assert [(s.name, s.connector) for s in spec.services] == [
        ("orders", "generator"),
        ("valid-orders", "filter"),
        ("archive", "jsonl_file_sink"),
        ("warehouse", "jsonl_file_sink"),
    ]
    assert spec.service("orders").arg_value("--seed") == "7"


def test_service_lines_are_parsed_with_shell_quoting_and_checked() -> None:
    text = "# dev: service m map --program 'value.x = 1; del value.y'\npipeline p { source a | sink b }\n"
    assert parse_services(text, "f.etl") == (
        ServiceSpec("m", "map", ("--program", "value.x = 1; del value.y")),
    )
    with pytest.raises(SpecError, match=r"f.etl:2: unknown connector 'kafka'"):
        parse_services("\n# dev: service k kafka\n", "f.etl")
    with pytest.raises(SpecError, match="declared twice"):
        parse_services("# dev: service a filter\n# dev: service a map\n", "f.etl")
    with pytest.raises(SpecError, match="expected `# dev: service NAME CONNECTOR"):
        parse_services("# dev: services a filter\n", "f.etl")
    # A file without service lines runs with the sample's services.
    assert [s.name for s in load_spec("pipeline p { source orders | sink archive }", "p.etl").services] == [
        "orders",
        "valid-orders",
        "archive",
        "warehouse",
    ]


def test_fixed_layout_follows_the_documented_offsets_and_free_ports_are_distinct() -> None:
    fixed = layout.make_layout(17400, 3, 4)
    assert fixed.router_grpc == (17400, 17401, 17402)
    assert fixed.router_http == (17480, 17481, 17482)
    assert fixed.service == (17500, 17501, 17502, 17503)
    assert fixed.sidecar_grpc == (17600, 17601, 17602, 17603)
    assert fixed.sidecar_http == (17680, 17681, 17682, 17683)
    free = layout.make_layout(0, 3, 4).all_ports()
    assert len(set(free)) == len(free) == 18
    with pytest.raises(layout.LayoutError):
        layout.make_layout(65500, 3, 4)


def test_busy_ports_names_ports_something_listens_on() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert layout.busy_ports([port]) == [port]


def _reply() -> admin_pb2.ListPipelinesResponse:
    src, mid, a, b = "st-src", "st-mid", "st-a", "st-b"
    both = ["p-a", "p-b"]
    stage = control_pb2.StageSpec
    source, transform, sink = (
        control_pb2.SERVICE_KIND_SOURCE,
        control_pb2.SERVICE_KIND_TRANSFORM,
        control_pb2.SERVICE_KIND_SINK,
    )
    dag = control_pb2.DagSpec(
        id=src,
        stages=[  # not in tree order: the view orders them
            stage(id=a, kind=sink, service="archive", pipelines=["p-a"]),
            stage(
                id=mid,
                kind=transform,
                service="valid",
                downstream=[a, b],
                pipelines=both,
                options={"config.expr": "value.amount >= 500"},
            ),
            stage(id=src, kind=source, service="orders", downstream=[mid], pipelines=both),
            stage(id=b, kind=sink, service="wh", pipelines=["p-b"]),
        ],
    )
    pipelines = [admin_pb2.Pipeline(name=n, phase=admin_pb2.PIPELINE_PHASE_RUNNING) for n in both]
    return admin_pb2.ListPipelinesResponse(pipelines=pipelines, dags=[dag])


METRICS_A = """\
# TYPE etlrouter_component_received_events_total counter
etlrouter_component_received_events_total{dag="st-src",stage="st-src"} 100.0
etlrouter_component_received_events_total{dag="st-src",stage="st-a"} 90.0
# TYPE etlrouter_source_acked_events_total counter
etlrouter_source_acked_events_total{dag="st-src",stage="st-src"} 80.0
# TYPE etlrouter_dlq_written_events_total counter
etlrouter_dlq_written_events_total{dag="st-src",stage="st-mid",reason="permanent"} 3.0
# TYPE etlrouter_edge_credits_available_records gauge
etlrouter_edge_credits_available_records{dag="st-src",edge="st-mid->st-a#0"} 1500.0
# TYPE etlrouter_watermark_lag_seconds gauge
etlrouter_watermark_lag_seconds{dag="st-src",stage="st-a"} 2.5
etlrouter_watermark_lag_seconds{dag="st-src",stage="st-src"} 2.0
"""
METRICS_B = """\
# TYPE etlrouter_component_received_events_total counter
etlrouter_component_received_events_total{dag="st-src",stage="st-a"} 10.0
# TYPE etlrouter_raft_is_leader gauge
etlrouter_raft_is_leader 1.0
"""


def test_topology_is_depth_first_and_marks_shared_stages() -> None:
    topo = view.topology_from(_reply())
    assert [(s.service, s.depth, s.kind) for s in topo.stages] == [
        ("orders", 0, "source"),
        ("valid", 1, "transform"),
        ("archive", 2, "sink"),
        ("wh", 2, "sink"),
    ]
    assert [s.service for s in view.shared_stages(topo)] == ["orders", "valid"]
    assert [s.service for s in topo.path_to(topo.stages[3])] == ["orders", "valid", "wh"]
    assert topo.phases == (("p-a", "RUNNING"), ("p-b", "RUNNING"))


def test_metrics_of_all_processes_add_up_and_render_as_rates() -> None:
    topo = view.topology_from(_reply())
    before = view.Sample(at=10.0)
    view.parse_metrics(METRICS_A, before, "sidecar-1")
    now = view.Sample(at=12.0)
    view.parse_metrics(METRICS_A.replace("} 90.0", "} 150.0"), now, "sidecar-1")
    view.parse_metrics(METRICS_B, now, "router-0")
    assert now.received["st-src", "st-a"] == 160.0
    assert now.leaders == ["router-0"]
    lines = view.render(topo, now, before, ["title"], color=False)
    archive = next(line for line in lines if "archive" in line)
    assert archive.split()[2:5] == ["sink", "35", "160"]  # (160 - 90) / 2 s
    assert "1500" in archive and "0.5s" in archive  # BEHIND: the stage's watermark lag minus its source's
    valid = next(line for line in lines if "valid" in line)
    assert " 3 " in valid and "p-a, p-b (shared)" in valid
    assert "raft leader: router-0" in lines
    assert "archive: 160 (35/s)" in view.summary_line(topo, now, before)


def test_expected_offsets_follow_filters_and_a_sink_file_is_read_incrementally(tmp_path: Path) -> None:
    config = generator_config(["--seed", "3", "--limit", "300"])
    assert config == GeneratorConfig(seed=3, limit=300)
    step = PathStep("filter", ServiceSpec("f", "filter"), {"config.expr": "value.amount >= 500"})
    expected = expected_offsets(config, [step])
    assert expected is not None
    amounts = {o: json.loads(make_record(config, 0, o).value)["amount"] for o in range(300)}
    assert expected == {o for o, amount in amounts.items() if amount >= 500}
    assert 0 < len(expected) < 300
    assert expected_offsets(config, [PathStep("lookup_file", ServiceSpec("l", "lookup_file"), {})]) is None
    path = tmp_path / "s.jsonl"
    sink = SinkFile(path)
    sink.refresh()
    path.write_text('{"offset": 1}\n{"offset": 2}\n{"offs')
    sink.refresh()
    assert sink.offsets == {1, 2} and sink.lines == 2
    with path.open("a") as f:
        f.write('et": 3}\n')
    sink.refresh()
    assert sink.offsets == {1, 2, 3} and sink.lines == 3
