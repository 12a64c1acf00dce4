"""A sink service as a stage's DLQ (`dlq = "dead"`), every part its own process: http_ingest -> filter
(poison records fail) -> jsonl sink `out`; the poison goes to the jsonl sink `dead` with its provenance in
headers. With `dead` killed, dead letters fall back to the filter sidecar's local store, counted."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.processes import Processes, connector, ready, wait_until
from tests.e2e.test_http_ingest import start_ingest
from tests.e2e.test_pipeline import apply
from tests.e2e.test_push_helpers import metric, post, push_sidecar
from tests.integration.cluster import RouterProcesses

PIPELINE = (
    'pipeline clicks-out { source clicks | transform valid (config.expr = "value.n >= 0", dlq = "dead") '
    "| sink out }"
)


def test_poison_records_go_to_the_dlq_sink_with_provenance_and_fall_back_when_it_is_down(
    system: tuple[RouterProcesses, Processes, Path],
) -> None:
    routers, procs, tmp = system
    out, dead = tmp / "out.jsonl", tmp / "dead.jsonl"
    url, sc_clicks = start_ingest(procs, routers)
    valid = connector(procs, "valid", "filter")
    sc_valid, _ = push_sidecar(procs, "sc-valid", routers, [valid])
    out_port = connector(procs, "out", "jsonl_file_sink", "--path", str(out))
    dead_port = connector(procs, "dead", "jsonl_file_sink", "--path", str(dead))
    sc_sinks, _ = push_sidecar(procs, "sc-sinks", routers, [out_port, dead_port])
    wait_until(lambda: all(ready(p) for p in (sc_clicks, sc_valid, sc_sinks)), 30, "sidecars registered")
    apply(routers, PIPELINE)

    # A string does not compare with a number: the filter fails these records (PERMANENT).
    body = b'{"user": "a", "n": 1}\n{"n": "poison-1"}\n{"user": "b", "n": 2}\n{"n": "poison-2"}\n'
    wait_until(lambda: post(url + "?wait=delivered", body)[0] == 200, 30, "a delivered request")
    letters = [json.loads(line) for line in dead.read_text().splitlines()]
    poison = [x for x in letters if "poison" in x["value"]]
    assert sorted(x["value"] for x in poison) == ['{"n": "poison-1"}', '{"n": "poison-2"}'], letters
    headers = poison[0]["headers"]
    assert headers["etlrouter.dlq.pipeline"] == "clicks-out"
    assert headers["etlrouter.dlq.service"] == "valid" and headers["etlrouter.dlq.stage"].startswith("st-")
    assert headers["etlrouter.dlq.reason"] == "error" and "filter:" in headers["etlrouter.dlq.error"]
    assert headers["etlrouter.dlq.source"] == "clicks" and headers["etlrouter.dlq.error_class"]
    assert headers["etlrouter.dlq.batch"].startswith("clicks/0/") and headers["etlrouter.dlq.id"]
    assert {json.loads(line)["value"] for line in out.read_text().splitlines()} >= {
        '{"user": "a", "n": 1}',
        '{"user": "b", "n": 2}',
    }
    assert metric(sc_valid, "etlrouter_dlq_letters") == 0  # none stored locally

    procs.kill("dead")
    before = len(dead.read_text().splitlines())
    status, reply, _ = post(url + "?wait=delivered", b'{"n": "poison-3"}\n{"n": 3}\n', timeout=60)
    assert status == 200, reply  # delivered: the letter is durable in the local store instead
    assert len(dead.read_text().splitlines()) == before
    assert metric(sc_valid, "etlrouter_dlq_sink_fallback_events_total", sink="dead") >= 1
    assert metric(sc_valid, "etlrouter_dlq_letters") >= 1
    assert "go to the local dead-letter store" in procs.log("sc-valid")
