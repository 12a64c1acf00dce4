"""The HTTP ingest push source end to end, every part its own process: http_ingest -> its sidecar -> the
sink's sidecar -> a jsonl-file sink, with a 3-router cluster. Covers the answers (503 before a pipeline,
400 with the line, 202 accepted, 200 delivered), no loss across a kill -9 of the sink service, and 429
while the sink is stalled."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.conftest import free_port
from tests.e2e.processes import Processes, connector, jsonl_offsets, ready, wait_until
from tests.e2e.test_pipeline import apply
from tests.e2e.test_push_helpers import post, push_sidecar
from tests.integration.cluster import RouterProcesses

System = tuple[RouterProcesses, Processes, Path]


def start_ingest(procs: Processes, routers: RouterProcesses, **sidecar_env: str) -> tuple[str, int]:
    """http_ingest `clicks` and its sidecar; returns (the ingest URL, the sidecar's HTTP port)."""
    grpc_port, http_port = free_port(), free_port()
    sc_http, sc_address = push_sidecar(procs, "sc-clicks", routers, [grpc_port], **sidecar_env)
    procs.start(
        "clicks",
        [
            "-m", "etlrouter.connectors.http_ingest", "--name", "clicks", "--port", str(grpc_port),
            "--sidecar", sc_address, "--http-port", str(http_port), "--key-field", "user",
        ],
    )  # fmt: skip
    return f"http://127.0.0.1:{http_port}/ingest", sc_http


def lines(values: range) -> bytes:
    return b"".join(json.dumps({"user": f"u{n}", "n": n}).encode() + b"\n" for n in values)


def test_http_ingest_answers_and_loses_nothing_across_a_sink_kill(system: System) -> None:
    routers, procs, tmp = system
    out = tmp / "out.jsonl"
    url, sc_clicks = start_ingest(procs, routers)
    sink_port = connector(procs, "out", "jsonl_file_sink", "--path", str(out))
    sc_out, _ = push_sidecar(procs, "sc-out", routers, [sink_port])
    wait_until(lambda: ready(sc_clicks) and ready(sc_out), 30, "sidecars registered")

    # No pipeline reads `clicks` yet: 503 naming why, not a silent drop.
    def refused_503() -> bool:
        status, body, headers = post(url, lines(range(1)))
        return status == 503 and "no pipeline reads source" in body["error"] and headers["Retry-After"] == "1"

    wait_until(refused_503, 30, "503 'no pipeline reads source' from the ingest")

    apply(routers, "pipeline clicks-out { source clicks | sink out }")
    wait_until(lambda: post(url, lines(range(0)) + b"{}\n")[0] in (200, 202), 30, "the pipeline accepting")

    status, body, _ = post(url, b'{"user": "a"}\n{"user": oops}\n\n[1,\n')
    assert status == 400
    assert "line 2: invalid JSON" in body["error"] and "line 4: invalid JSON" in body["error"], body
    status, body, _ = post(url, b'[{"user": "a"},\n {"user": }]')
    assert status == 400 and body["error"].startswith("line 2, column"), body
    status, body, _ = post(url + "?wait=soon", lines(range(1)))
    assert status == 400 and "?wait='soon'" in body["error"], body

    status, body, _ = post(url, lines(range(0, 100)))  # the default waits for delivery
    assert status == 200 and body["delivered"] == 100, body
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert {json.loads(r["value"])["n"] for r in written if "n" in json.loads(r["value"])} >= set(range(100))

    # Batches keep coming while the sink service is killed and restarted: each accepted one reaches it.
    accepted_offsets: list[tuple[int, int]] = []
    n = 100
    killed = restarted = False
    deadline = time.monotonic() + 60
    while len(accepted_offsets) < 60 and time.monotonic() < deadline:
        status, body, _ = post(url + "?wait=accepted", lines(range(n, n + 50)))
        if status == 202:
            accepted_offsets.append((body["first_offset"], body["last_offset"]))
            n += 50
        else:
            assert status in (429, 503), (status, body)
            time.sleep(0.05)
        if len(accepted_offsets) == 15 and not killed:
            procs.kill("out")  # kill -9 with batches in flight
            killed = True
        if len(accepted_offsets) >= 30 and killed and not restarted:
            procs.restart("out")
            restarted = True
    assert killed and restarted and len(accepted_offsets) == 60, len(accepted_offsets)
    wanted = {o for first, last in accepted_offsets for o in range(first, last + 1)}
    wait_until(lambda: wanted <= set(jsonl_offsets(out)), 60, "every accepted record in the sink")


def test_http_ingest_answers_429_while_the_sink_is_stalled(system: System) -> None:
    routers, procs, tmp = system
    url, sc_clicks = start_ingest(procs, routers, edge_buffer_records="200")
    stats = tmp / "stuck.json"
    sink_port = free_port()
    script = str(Path(__file__).with_name("slow_sink.py"))
    procs.start(
        "stuck", [script, "--name", "stuck", "--port", str(sink_port), "--stats", str(stats), "--stall"]
    )
    sc_out, _ = push_sidecar(procs, "sc-stuck", routers, [sink_port], edge_buffer_records="200")
    wait_until(lambda: ready(sc_clicks) and ready(sc_out), 30, "sidecars registered")
    apply(routers, "pipeline clicks-stuck { source clicks | sink stuck (timeout = 1h) }")

    statuses: list[int] = []

    def got_429() -> bool:
        status, body, headers = post(url + "?wait=accepted", lines(range(50)))
        statuses.append(status)
        if status == 429:
            assert headers["Retry-After"] == "1" and "no credits" in body["error"], body
        return status == 429

    wait_until(got_429, 60, "HTTP 429 from the ingest while the sink is stalled")
    # It took at most the window (200 records here, plus the batch that went into debt) to fill it up.
    assert statuses.count(202) <= 200 // 50 + 1, statuses
