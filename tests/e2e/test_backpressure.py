"""Backpressure and fan-out isolation across real processes: 3 routers, sidecars, services, all on loopback.

- A sink that writes at a tenth of the source's rate slows the source's pulls to its own pace, and every
  sidecar's memory stays bounded (VmRSS from /proc, sampled through the run) and stops growing.
- Under `on_branch_lag = shed(after = 1s)`, a sink that never answers does not hold back its sibling: the
  sibling keeps receiving at the source's rate, and the shed copies are in the dead-letter queue.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from etlrouter._proto.v1 import dataplane_grpc, dataplane_pb2
from etlrouter.core.grpc import open_channel
from tests.conftest import free_port
from tests.e2e.processes import Processes, connector, ready, wait_until
from tests.e2e.test_pipeline import apply
from tests.integration.cluster import RouterProcesses

RSS_BOUND_MIB = 250


class Sidecar:
    def __init__(self, name: str, http_port: int, grpc_port: int) -> None:
        self.name, self.http_port, self.grpc_port = name, http_port, grpc_port


def start_sidecar(
    procs: Processes, sidecar_id: str, routers: RouterProcesses, ports: list[int], **config: str
) -> Sidecar:
    """An `etlrouter sidecar` scanning `ports`; `config` adds ETLROUTER_SIDECAR__<KEY> settings."""
    http_port, grpc_port = free_port(), free_port()
    env = {
        "ETLROUTER_SIDECAR__DATA_DIR": str(procs.workdir / sidecar_id),
        "ETLROUTER_SIDECAR__HEARTBEAT_INTERVAL_MS": "500",
        "ETLROUTER_SIDECAR__SCAN_INTERVAL_MS": "500",
        "ETLROUTER_SIDECAR__DRAIN_TIMEOUT_MS": "2000",
        "ETLROUTER_LOGGING__FORMAT": "json",
        **{f"ETLROUTER_SIDECAR__{key.upper()}": value for key, value in config.items()},
    }
    args = ["-m", "etlrouter", "sidecar", "--id", sidecar_id]
    args += [arg for address in routers.addresses for arg in ("--router", address)]
    args += ["--scan-ports", ",".join(map(str, ports)), "--grpc-port", str(grpc_port)]
    args += ["--http-port", str(http_port)]
    procs.start(sidecar_id, args, env)
    return Sidecar(sidecar_id, http_port, grpc_port)


def slow_sink(procs: Processes, name: str, stats: Path, *args: str) -> int:
    port = free_port()
    script = str(Path(__file__).with_name("slow_sink.py"))
    procs.start(name, [script, "--name", name, "--port", str(port), "--stats", str(stats), *args])
    return port


def metric(http_port: int, name: str, **labels: str) -> float:
    """Sum of a metric's samples on a sidecar whose labels include `labels`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def sink_records(stats: Path) -> int:
    try:
        return int(json.loads(stats.read_text())["records"])
    except (OSError, ValueError, KeyError):
        return 0


def file_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


Sample = tuple[float, float, int, dict[str, float]]  # (t, records pulled, records written, RSS per sidecar)
SOURCE_RATE = 10_000  # records/s
SINK_RATE = 1_000  # a tenth
WINDOW = 5_000  # edge_buffer_records: the source keeps at most 2 windows of batches in flight


def test_a_slow_sink_slows_the_source_and_sidecar_memory_stays_bounded(
    system: tuple[RouterProcesses, Processes, Path],
) -> None:
    routers, procs, tmp = system
    stats = tmp / "slow.json"
    src = connector(procs, "orders", "generator", "--rate", str(SOURCE_RATE), "--record-size", "250")
    mid = connector(procs, "pass", "filter")
    sink = slow_sink(procs, "slow", stats, "--records-per-second", str(SINK_RATE))
    sidecars = [
        start_sidecar(procs, "sc-src", routers, [src], edge_buffer_records=str(WINDOW)),
        start_sidecar(procs, "sc-mid", routers, [mid], edge_buffer_records=str(WINDOW)),
        start_sidecar(procs, "sc-sink", routers, [sink], edge_buffer_records=str(WINDOW)),
    ]
    wait_until(lambda: all(ready(s.http_port) for s in sidecars), 30, "sidecars registered")
    apply(
        routers,
        'pipeline slow { source orders (batch_size = 1000) | transform pass (config.expr = "true")'
        " | sink slow }",
    )
    wait_until(lambda: sink_records(stats) > 0, 30, "records at the slow sink")

    pids = {s.name: procs.procs[s.name].pid for s in sidecars}
    samples: list[Sample] = []
    started = time.monotonic()
    while (t := time.monotonic() - started) < 20:
        pulled = metric(sidecars[0].http_port, "etlrouter_component_received_events_total")
        samples.append((t, pulled, sink_records(stats), {n: rss_mib(p) for n, p in pids.items()}))
        time.sleep(0.5)

    def rate(t0: float, t1: float, count: Callable[[Sample], float]) -> float:
        window = [s for s in samples if t0 <= s[0] <= t1]
        first, last = window[0], window[-1]
        return (count(last) - count(first)) / (last[0] - first[0])

    # The first seconds fill the in-flight bound and the edge windows; after that the source is paced.
    pull_rate, write_rate = rate(8, 20, lambda s: s[1]), rate(8, 20, lambda s: s[2])
    inflight = max(int(s[1]) - s[2] for s in samples)
    print(f"\nsource pulled {pull_rate:.0f} records/s, sink wrote {write_rate:.0f} records/s (t = 8..20 s)")
    print(f"records pulled and not yet written: at most {inflight} (bound: 2 x {WINDOW})")
    print("RSS MiB   " + "  ".join(f"{n:>8}" for n in pids) + "    pulled  written")
    for t, pulled, written, rss in samples[::4]:
        print(f"t={t:5.1f}s " + "  ".join(f"{rss[n]:8.1f}" for n in pids) + f"  {pulled:8.0f} {written:8}")
    assert 0.5 * SINK_RATE <= write_rate <= 1.5 * SINK_RATE
    assert pull_rate <= 2 * SINK_RATE, f"the source is still pulled at {pull_rate:.0f} records/s"
    assert pull_rate >= 0.5 * SINK_RATE, "the pipeline stopped instead of slowing down"
    assert inflight <= 2 * WINDOW + 1000  # + the batch the sink is writing when its count is read
    for name in pids:
        peak = max(s[3][name] for s in samples)
        middle = max(s[3][name] for s in samples if 4 <= s[0] <= 12)
        late = max(s[3][name] for s in samples if s[0] > 12)
        assert peak < RSS_BOUND_MIB, f"{name} reached {peak:.0f} MiB"
        assert late <= middle + 16, f"{name} keeps growing: {middle:.0f} MiB, then {late:.0f} MiB"
    for s in sidecars:
        assert "Traceback" not in procs.log(s.name), procs.log(s.name)[-3000:]


def list_dead_letters(grpc_port: int) -> dataplane_pb2.ListDeadLettersResponse:
    async def go() -> dataplane_pb2.ListDeadLettersResponse:
        channel = open_channel(f"127.0.0.1:{grpc_port}")
        try:
            stub = dataplane_grpc.SidecarAdminStub(channel)
            return await stub.ListDeadLetters(dataplane_pb2.ListDeadLettersRequest(limit=100), timeout=10)
        finally:
            channel.close()

    return asyncio.run(go())


@dataclass
class FanOut:
    pull_rate: float  # records/s the source was pulled at
    fast_rate: float  # records/s the healthy sibling wrote
    shed: float  # records shed (etlrouter_component_discarded_events_total{reason="shed"})
    dead: dict[str, dataplane_pb2.ListDeadLettersResponse]  # per sidecar
    pending: float  # etlrouter_source_inflight_batches: batches the ledger has not released


def fan_out_with_a_stalled_branch(
    system: tuple[RouterProcesses, Processes, Path], *generator_args: str
) -> FanOut:
    """source orders -> {fast (a jsonl file), stuck (never answers), shed after 1 s}; measures for 12 s."""
    routers, procs, tmp = system
    fast_file = tmp / "fast.jsonl"
    src = connector(procs, "orders", "generator", *generator_args)
    fast = connector(procs, "fast", "jsonl_file_sink", "--path", str(fast_file))
    stuck = slow_sink(procs, "stuck", tmp / "stuck.json", "--stall")
    sidecars = [
        start_sidecar(procs, "sc-src", routers, [src]),
        start_sidecar(procs, "sc-fast", routers, [fast]),
        start_sidecar(procs, "sc-stuck", routers, [stuck]),
    ]
    wait_until(lambda: all(ready(s.http_port) for s in sidecars), 30, "sidecars registered")
    apply(
        routers,
        "pipeline to-fast { source orders | sink fast }\n"
        "pipeline to-stuck { source orders | sink stuck on_branch_lag = shed(after = 1s) }\n",
    )
    wait_until(lambda: file_lines(fast_file) > 0, 30, "records at the fast sink")

    samples: list[tuple[float, float, int]] = []  # (t, records the source pulled, lines in the fast file)
    started = time.monotonic()
    while (t := time.monotonic() - started) < 12:
        pulled = metric(sidecars[0].http_port, "etlrouter_component_received_events_total")
        samples.append((t, pulled, file_lines(fast_file)))
        time.sleep(0.5)
    late = [s for s in samples if s[0] >= 4]  # the stuck sink's window is full and shedding has begun
    span = late[-1][0] - late[0][0]
    result = FanOut(
        pull_rate=(late[-1][1] - late[0][1]) / span,
        fast_rate=(late[-1][2] - late[0][2]) / span,
        shed=metric(sidecars[0].http_port, "etlrouter_component_discarded_events_total", reason="shed"),
        dead={s.name: list_dead_letters(s.grpc_port) for s in sidecars},
        pending=metric(sidecars[0].http_port, "etlrouter_source_inflight_batches"),
    )
    print(
        f"\nsource pulled {result.pull_rate:.0f} records/s, the fast sink wrote {result.fast_rate:.0f}"
        f" records/s (t = 4..12 s); {result.shed:.0f} records shed;"
        f" {result.pending:.0f} batches not yet acknowledged at the source"
    )
    for name, reply in result.dead.items():
        stages = sorted({(letter.stage_id, letter.reason) for letter in reply.dead_letters})
        print(f"{name}: {reply.total} dead letters (stage, reason): {stages}")
    for s in sidecars:
        assert "Traceback" not in procs.log(s.name), procs.log(s.name)[-3000:]
    return result


def test_a_stalled_branch_is_shed_and_its_sibling_keeps_the_source_rate(
    system: tuple[RouterProcesses, Processes, Path],
) -> None:
    # Unthrottled source, full 1000-record batches: the stuck sink's sidecar takes one credit window of
    # batches, then its branch starves for credits and every later copy is shed after 1 s.
    result = fan_out_with_a_stalled_branch(system)
    pull_rate, fast_rate = result.pull_rate, result.fast_rate
    # A branch that held the source back would stop it once two credit windows (2 x 20,000 records) are in
    # flight, within the first seconds: from t = 4 s on, near 0 records/s. Not a speed target (the machine
    # may be busy): a floor far above a stalled source.
    assert pull_rate >= 1500, f"the source slowed to {pull_rate:.0f} records/s"
    assert fast_rate >= 0.9 * pull_rate, f"the sibling wrote {fast_rate:.0f}/s of {pull_rate:.0f}/s pulled"
    assert result.shed > 0
    # The shed copies are dead-lettered by the stage that sheds them: the fan-out's parent, the source.
    letters = result.dead["sc-src"]
    assert letters.total > 0
    assert {letter.reason for letter in letters.dead_letters} == {"shed"}


FANOUT_RATE = 2_000


def test_a_stalled_branch_is_shed_when_the_source_is_rate_limited(
    system: tuple[RouterProcesses, Processes, Path],
) -> None:
    # A rate-limited source answers each pull with the few records its rate allows: small batches. The
    # stuck sink's sidecar accepts them all (its 20 000-record window is not full after the source's 40
    # batches in flight), so no batch ever waits for credits.
    result = fan_out_with_a_stalled_branch(system, "--rate", str(FANOUT_RATE))
    assert result.fast_rate >= 0.8 * FANOUT_RATE, f"the sibling slowed to {result.fast_rate:.0f}/s"
    assert result.shed > 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s"]))
