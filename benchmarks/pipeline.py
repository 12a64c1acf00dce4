#!/usr/bin/env python3
"""The routed pipeline (source -> transform -> sink across three sidecars) against the direct chain.

    python benchmarks/pipeline.py [--records 300000] [--record-size 250] [--rounds 3] [--inflight 4]
    python benchmarks/pipeline.py --batch-sizes 100 1000 5000 --records 200000 --rounds 2
    python benchmarks/pipeline.py --modes routed --records 1000000 --rounds 1 --keep --profile DIR

Every part is its own process on loopback: a 3-node router cluster (fsync off) for control, the
`generator` source (batches of --batch-sizes records, 1000 by default, ~250 B values), the `filter`
transform with an always-true expression, and a counting SDK sink defined in this file (`pipeline.py
sink`), which keeps per-batch arrival times in a small stats file.

- direct:  one driver process (`pipeline.py driver`) pulls from the source, calls ProcessBatch, calls
  WriteBatch and acknowledges in source order, with --inflight batches in flight, over grpclib with the
  raw (undecoded) batch messages the sidecars use: the least a router could do.
- routed:  three `etlrouter sidecar` processes, one beside each service, and the pipeline
  `source orders (batch_size = 1000) | transform pass (config.expr = "true") | sink count` applied
  through the router cluster.

Rounds alternate direct/routed with fresh services. Throughput is measured at the sink, from its first
batch to its last (start-up excluded). Batch latency is "source pull answered -> sink write done": measured
per batch by the driver; for the routed pipeline read from the source sidecar's `etlrouter_batch_seconds`
histogram (pull answered -> every branch DONE) and interpolated within its buckets like Prometheus'
histogram_quantile. CPU seconds per process come from /proc/PID/stat over the run; "other load" is the
rest of the machine's busy CPU over the same time (the routers, and anything else running: on a shared
machine a round with other load is not comparable). The sink records each batch's offset range, so every
round also reports offsets never written and records written twice. --max-inflight N sets the source
stage's `max_inflight` option in the routed rounds (the direct driver always keeps --inflight batches).
A second table per batch size gives each process's CPU microseconds per record written, and the mean
over the three sidecars: the cost of one forwarding hop (target, issue #20: <= 2 us; routed total CPU
within 15% of direct).

--tls on|both runs the routed pipeline with mutual TLS on every part (a throw-away CA, as in
tests/security/pki.py; "both": plaintext and mTLS rounds alternate, each against its own 3-router
cluster, so both pay for two idle clusters alike). Target (issue): mTLS keeps >= 85% of plaintext.

--tracing off 0.01 1 runs the plaintext routed rounds once per tracing setting (off, 1% and 100% of batches
sampled, parentbased_traceidratio) in the same run, the sidecars exporting to an OTLP receiver in this
process. Target (issue): off costs nothing measurable, 1% at most 3% of throughput.

--profile DIR samples every process of the routed rounds with `py-spy record --format raw` (collapsed
stacks; `pip install py-spy` into the venv). --keep keeps the logs and each sidecar's final /metrics.

Targets (issue): routed >= 60% of direct, and >= 50 000 records/s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for tests.integration.cluster (the router processes)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PIPELINE = """
pipeline bench {
  source orders (%s)
  | transform pass (config.expr = "true")
  | sink count
}
"""


# ---------------------------------------------------------------------------------------------------------
# Child process: the counting sink.


def run_sink(name: str, port: int, stats: Path) -> None:
    from etlrouter.sdk import Capabilities, Record, Sink, Written, run

    class CountingSink(Sink):
        capabilities = Capabilities(name=name, version="bench", idempotent_writes=False)

        def __init__(self) -> None:
            self.records = 0
            # (wall time written, records, first offset, last offset)
            self.batches: list[tuple[float, int, int, int]] = []
            self._saved = 0.0
            self._saver: asyncio.Future[None] | None = None

        async def write(
            self, batch_id: str, records: list[Record], options: Mapping[str, str]
        ) -> Written | None:
            now = time.time()
            self.records += len(records)
            if records:
                self.batches.append((now, len(records), records[0].offset, records[-1].offset))
            if now - self._saved > 0.2:
                self.save()
            return None

        def save(self) -> None:
            self._saved = time.time()
            tmp = stats.with_name(stats.name + ".tmp")
            tmp.write_text(json.dumps({"records": self.records, "batches": self.batches}))
            tmp.replace(stats)

        async def open(self) -> None:
            # Saved periodically too, so the last batches show even when no further write comes.
            self._saver = asyncio.ensure_future(self._save_every(0.2))

        async def _save_every(self, seconds: float) -> None:
            while True:
                await asyncio.sleep(seconds)
                self.save()

        async def close(self) -> None:
            if self._saver is not None:
                self._saver.cancel()
            self.save()

    sink = CountingSink()
    run(sink, host="127.0.0.1", port=port, log_level="warning", log_format="json")


# ---------------------------------------------------------------------------------------------------------
# Child process: the direct chain's driver.


async def drive(
    source: str, transform: str, sink: str, inflight: int, expr: str, batch_size: int
) -> dict[str, Any]:
    from etlrouter._proto.v1 import services_pb2
    from etlrouter.core.grpc import open_channel
    from etlrouter.sidecar.wire import ServiceClient

    channels = [open_channel(a) for a in (source, transform, sink)]
    src, mid, out = (ServiceClient(c) for c in channels)
    latencies: list[float] = []
    done: dict[int, int] = {}  # first offset -> last offset, completed but not yet acknowledged
    next_ack = 0
    ack_lock = asyncio.Lock()
    pull_lock = asyncio.Lock()
    finished = False
    records = 0

    async def acknowledge() -> None:
        nonlocal next_ack
        async with ack_lock:
            up_to = -1
            while next_ack in done:
                up_to = done.pop(next_ack)
                next_ack = up_to + 1
            if up_to >= 0:
                await src.acknowledge(
                    services_pb2.AcknowledgeRequest(
                        acks=[services_pb2.PartitionAck(partition=0, up_to_offset=up_to)]
                    )
                )

    async def worker() -> None:
        nonlocal finished, records
        while not finished:
            async with pull_lock:  # pulls in order, so the batches leave the source in offset order
                reply = await src.pull(
                    services_pb2.PullRecordsRequest(max_records=batch_size, wait_ms=500, max_bytes=16 << 20)
                )
            batch = reply.batch
            if not batch.records:
                if reply.end_of_stream:
                    finished = True
                continue
            started = time.monotonic()
            header = batch.header
            header.batch_id = f"orders/0/{header.first_offset}-{header.last_offset}"
            processed = await mid.process(
                services_pb2.RawProcessBatchRequest(batch=batch, options={"expr": expr})
            )
            batch.records = processed.batch.records
            written = await out.write(services_pb2.RawWriteBatchRequest(batch=batch))
            latencies.append(time.monotonic() - started)
            records += written.written
            done[header.first_offset] = header.last_offset
            await acknowledge()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    elapsed = time.monotonic() - started
    for channel in channels:
        channel.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "records": records,
        "seconds": elapsed,
        "latencies": latencies,
        "acked_up_to": next_ack - 1,
        "cpu": usage.ru_utime + usage.ru_stime,
    }


# ---------------------------------------------------------------------------------------------------------
# The orchestrator.


def free_port() -> int:
    from tests.conftest import free_port as pick

    return pick()


class Procs:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> int:
        log = (self.workdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, *args], stdout=log, stderr=log, env={**os.environ, **(env or {})}
        )
        self.procs[name] = proc
        return proc.pid

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy() -> float:
    """CPU seconds every process on the machine has used (all cores, from /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def read_stats(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {"records": 0, "batches": []}


def sink_throughput(stats: dict[str, Any]) -> float:
    """Records/s from the first written batch to the last (the first batch's records are not counted)."""
    batches = stats["batches"]
    if len(batches) < 2:
        return 0.0
    span = batches[-1][0] - batches[0][0]
    return (sum(b[1] for b in batches) - batches[0][1]) / span if span > 0 else 0.0


def delivery_check(stats: dict[str, Any], total: int) -> tuple[int, int]:
    """(offsets of 0..total-1 never written, records written more than once), from the sink's batches."""
    seen = bytearray(total)
    duplicates = 0
    for _, n, first, last in stats["batches"]:
        for offset in range(first, last + 1):
            if offset < total:
                duplicates += seen[offset]
                seen[offset] = 1
        duplicates += n - (last - first + 1) if n > last - first + 1 else 0
    return total - sum(seen), duplicates


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Prometheus-style quantile from cumulative (upper bound, count) buckets."""
    total = buckets[-1][1]
    if not total:
        return float("nan")
    rank = q * total
    counts = [c for _, c in buckets]
    i = bisect.bisect_left(counts, rank)
    upper, count = buckets[i]
    lower, below = (0.0, 0.0) if i == 0 else buckets[i - 1]
    if upper == float("inf"):
        return lower
    return lower + (upper - lower) * (rank - below) / max(1e-9, count - below)


def scrape(http_port: int, pki: Any = None) -> str:
    if pki is None:
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/metrics")
    else:
        auth = {"Authorization": f"Bearer {pki.tokens['viewer']}"}
        request = urllib.request.Request(f"https://127.0.0.1:{http_port}/metrics", headers=auth)
    with urllib.request.urlopen(request, timeout=5, context=pki.https() if pki else None) as r:
        return str(r.read().decode())


def batch_seconds_buckets(metrics: str) -> list[tuple[float, float]]:
    buckets = []
    for line in metrics.splitlines():
        if line.startswith("etlrouter_batch_seconds_bucket{"):
            labels, value = line.rsplit(" ", 1)
            le = labels.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), float(value)))
    return sorted(buckets)


def ready(http_port: int, pki: Any = None) -> bool:
    scheme = "https" if pki else "http"
    try:
        with urllib.request.urlopen(
            f"{scheme}://127.0.0.1:{http_port}/readyz", timeout=2, context=pki.https() if pki else None
        ) as r:
            return bool(json.loads(r.read())["ready"])
    except OSError:
        return False


def apply(addresses: list[str], text: str, pki: Any = None) -> None:
    from etlrouter._proto.v1 import admin_grpc, admin_pb2
    from etlrouter.client.router import RouterClient

    async def go() -> None:
        client = RouterClient(addresses, timeout=20, security=pki.security() if pki else None)
        try:
            reply = await client.call(
                admin_grpc.PipelineAdminStub,
                "ApplyPipelines",
                admin_pb2.ApplyPipelinesRequest(definition=text, filename="bench.etl"),
                write=True,
            )
            assert not reply.diagnostics, [d.message for d in reply.diagnostics]
        finally:
            client.close()

    asyncio.run(go())


def delete_pipeline(addresses: list[str], name: str, pki: Any = None) -> None:
    from etlrouter._proto.v1 import admin_grpc, admin_pb2
    from etlrouter.client.router import RouterClient

    async def go() -> None:
        client = RouterClient(addresses, timeout=20, security=pki.security() if pki else None)
        try:
            await client.call(
                admin_grpc.PipelineAdminStub,
                "DeletePipeline",
                admin_pb2.DeletePipelineRequest(name=name),
                write=True,
            )
        finally:
            client.close()

    asyncio.run(go())


def start_services(procs: Procs, work: Path, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    ports = {"src": free_port(), "mid": free_port(), "sink": free_port()}
    pids = {
        "source": procs.start(
            f"{tag}-source",
            [
                "-m",
                "etlrouter.connectors.generator",
                "--name",
                "orders",
                "--port",
                str(ports["src"]),
                "--limit",
                str(args.records),
                "--record-size",
                str(args.record_size),
                "--log-level",
                "warning",
            ],
        ),
        "transform": procs.start(
            f"{tag}-transform",
            [
                *("-m", "etlrouter.connectors.filter", "--name", "pass", "--port", str(ports["mid"])),
                "--log-level",
                "warning",
            ],
        ),
        "sink": procs.start(
            f"{tag}-sink",
            [
                __file__,
                "sink",
                "--name",
                "count",
                "--port",
                str(ports["sink"]),
                "--stats",
                str(work / "s.json"),
            ],
        ),
    }
    return {"ports": ports, "pids": pids, "stats": work / "s.json"}


def wait_listening(port: int) -> None:
    import socket

    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(up, 20, f"port {port} listening")


def run_direct(procs: Procs, base: Path, args: argparse.Namespace, n: int) -> dict[str, Any]:
    work = base / f"direct-{n}"
    work.mkdir()
    svc = start_services(procs, work, args, f"direct{n}")
    for port in svc["ports"].values():
        wait_listening(port)
    cpu0 = {k: cpu_seconds(p) for k, p in svc["pids"].items()}
    busy0, started = machine_busy(), time.monotonic()
    out = work / "driver.json"
    addresses = [f"127.0.0.1:{svc['ports'][k]}" for k in ("src", "mid", "sink")]
    procs.start(
        f"direct{n}-driver",
        [
            *(__file__, "driver", *addresses, "--inflight", str(args.inflight)),
            *("--batch-size", str(args.batch_size), "--out", str(out)),
        ],
    )
    wait_until(lambda: out.exists(), 300, "the driver to finish")
    result = json.loads(out.read_text())
    wait_until(lambda: read_stats(svc["stats"])["records"] >= args.records, 10, "sink stats")
    cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in svc["pids"].items()}
    cpu["driver"] = result["cpu"]
    other = machine_busy() - busy0 - sum(cpu.values())
    wall = time.monotonic() - started
    stats = read_stats(svc["stats"])
    missing, duplicates = delivery_check(stats, args.records)
    return {
        "missing": missing,
        "duplicates": duplicates,
        "other_cores": max(0.0, other / wall),
        "rate": sink_throughput(stats),
        "p50": percentile(result["latencies"], 0.5),
        "p99": percentile(result["latencies"], 0.99),
        "records": stats["records"],
        "cpu": cpu,
        "acked": result["acked_up_to"] + 1,
    }


def run_routed(
    procs: Procs,
    base: Path,
    args: argparse.Namespace,
    n: int,
    routers: Any,
    pki: Any = None,
    trace_env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    tag = "-tls" if pki else ""
    if trace_env:
        tag += f"-trace{trace_env.get('OTEL_TRACES_SAMPLER_ARG', 'off')}"
    work = base / f"routed-{n}{tag}"
    work.mkdir()
    svc = start_services(procs, work, args, f"routed{n}")
    for port in svc["ports"].values():
        wait_listening(port)
    http: dict[str, int] = {}
    pids = dict(svc["pids"])
    for role, port in svc["ports"].items():
        sidecar_id = f"sc-{role}-{n}"
        http[role] = free_port()
        env = {
            "ETLROUTER_SIDECAR__DATA_DIR": str(work / sidecar_id),
            "ETLROUTER_SIDECAR__HEARTBEAT_INTERVAL_MS": "500",
            "ETLROUTER_SIDECAR__SCAN_INTERVAL_MS": "500",
            "ETLROUTER_LOGGING__FORMAT": "json",
            "ETLROUTER_LOGGING__LEVEL": "warning",
            **(pki.env("sidecar", sidecar_id) if pki else {}),
            **(trace_env or {}),
        }
        router_args = [a for address in routers.addresses for a in ("--router", address)]
        pids[sidecar_id.rsplit("-", 1)[0]] = procs.start(
            sidecar_id,
            [
                *("-m", "etlrouter", "sidecar", "--id", sidecar_id, *router_args, "--scan-ports", str(port)),
                *("--grpc-port", str(free_port()), "--http-port", str(http[role])),
            ],
            env,
        )
    wait_until(lambda: all(ready(p, pki) for p in http.values()), 60, "sidecars registered")
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    profilers = [
        subprocess.Popen(
            [
                *(py_spy(), "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "--nonblocking"),
                *("--output", str(args.profile / f"{name}-{n}.txt")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in (pids.items() if args.profile else ())
    ]
    busy0, started = machine_busy(), time.monotonic()
    source_options = f"batch_size = {args.batch_size}" + (
        f", max_inflight = {args.max_inflight}" if args.max_inflight else ""
    )
    apply(routers.addresses, PIPELINE % source_options, pki)
    # Until every offset is at the sink, or nothing more arrives for 20 s.
    written, progress_at, missing = 0, time.monotonic(), args.records
    while missing and time.monotonic() - progress_at < 20:
        time.sleep(0.1)
        if (now_written := read_stats(svc["stats"])["records"]) > written:
            written, progress_at = now_written, time.monotonic()
        if written >= args.records:
            missing, _ = delivery_check(read_stats(svc["stats"]), args.records)
    cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
    other = machine_busy() - busy0 - sum(cpu.values())
    wall = time.monotonic() - started
    for profiler in profilers:  # py-spy writes its output on SIGINT
        profiler.send_signal(signal.SIGINT)
    for profiler in profilers:
        profiler.wait(timeout=30)
    stats = read_stats(svc["stats"])
    for role, port in http.items():  # for post-mortems with --keep
        (work / f"sc-{role}.metrics").write_text(scrape(port, pki))
    # The source sidecar runs one stage (the source): its histogram is the end-to-end batch latency.
    buckets = batch_seconds_buckets(scrape(http["src"], pki))
    delete_pipeline(routers.addresses, "bench", pki)
    missing, duplicates = delivery_check(stats, args.records)
    return {
        "missing": missing,
        "duplicates": duplicates,
        "other_cores": max(0.0, other / wall),
        "rate": sink_throughput(stats),
        "p50": histogram_quantile(0.5, buckets) if buckets else float("nan"),
        "p99": histogram_quantile(0.99, buckets) if buckets else float("nan"),
        "records": stats["records"],
        "cpu": cpu,
        "buckets": buckets,
    }


def py_spy() -> str:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else "py-spy"


def stop_round(procs: Procs) -> None:
    procs.stop_all()


def main_bench(args: argparse.Namespace) -> None:
    from tests.integration.cluster import RouterProcesses
    from tests.security.pki import TestPki

    base = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    pki = TestPki(base / "pki") if args.tls != "off" else None
    clusters: dict[str, Any] = {}  # "routed" (plaintext) and/or "routed+mtls": a router cluster each
    if args.tls in ("off", "both"):
        clusters["routed"] = RouterProcesses(base / "routers", fsync=False)
    if pki is not None:
        clusters["routed+mtls"] = RouterProcesses(
            base / "routers-tls", fsync=False, env_for=lambda node: pki.env("router", node), https=pki.https()
        )
    modes = [m for mode in args.modes for m in (clusters if mode == "routed" else ["direct"])]
    # --tracing: the plaintext routed rounds once per sampling setting, spans exported to a receiver here.
    receiver, tracing_modes = None, {}
    if args.tracing:
        from tests.observability.otlp import Receiver

        receiver = Receiver()
        endpoint = f"http://127.0.0.1:{receiver.start()}"
        for setting in args.tracing:
            name = "routed" if setting == "off" else f"routed+trace{float(setting):.0%}"
            tracing_modes[name] = (
                {"OTEL_SDK_DISABLED": "true"}
                if setting == "off"
                else {
                    "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                    "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                    "OTEL_TRACES_SAMPLER_ARG": setting,
                }
            )
        modes = [m for mode in modes for m in (tracing_modes if mode == "routed" else [mode])]
    procs = Procs(base)
    results: dict[tuple[int, str], list[dict[str, Any]]] = {
        (size, mode): [] for size in args.batch_sizes for mode in modes
    }
    for cluster in clusters.values():
        cluster.start_all()
    try:
        for cluster in clusters.values():
            cluster.wait_ready()
        for i, size in enumerate(args.batch_sizes):
            args.batch_size = size
            for r in range(args.rounds):
                n = i * args.rounds + r  # names processes, sidecar ids and work directories: unique per run
                for mode in modes:
                    if mode == "direct":
                        result = run_direct(procs, base, args, n)
                    elif mode in tracing_modes:
                        result = run_routed(
                            procs, base, args, n, clusters["routed"], None, tracing_modes[mode]
                        )
                    else:
                        tls = pki if mode == "routed+mtls" else None
                        result = run_routed(procs, base, args, n, clusters[mode], tls)
                    stop_round(procs)
                    results[size, mode].append(result)
                    cpu = ", ".join(f"{k} {v:.1f}" for k, v in result["cpu"].items())
                    print(
                        f"{size}-record batches, round {r} {mode:11}: {result['rate']:9.0f} rec/s  "
                        f"p50 {result['p50'] * 1000:6.1f} ms  p99 {result['p99'] * 1000:6.1f} ms  "
                        f"({result['records']} records written, {result['missing']} offsets missing, "
                        f"{result['duplicates']} duplicates; CPU s: {cpu}; "
                        f"other load {result['other_cores']:.2f} cores)",
                        flush=True,
                    )
    finally:
        procs.stop_all()
        for cluster in clusters.values():
            cluster.stop_all()
        if receiver is not None:
            print(f"spans received: {len(receiver.spans())}")
            receiver.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"logs kept in {base}")
    for size in args.batch_sizes:
        print_tables(args, size, modes, tracing_modes, {mode: results[size, mode] for mode in modes})


SIDECARS = ("sc-src", "sc-mid", "sc-sink")


def print_tables(
    args: argparse.Namespace,
    size: int,
    modes: Sequence[str],
    tracing_modes: Mapping[str, Any],
    results: Mapping[str, list[dict[str, Any]]],
) -> None:
    def median_rate(mode: str) -> float:
        return statistics.median(r["rate"] for r in results[mode]) if results.get(mode) else 0.0

    def us_per_record(mode: str, process: str) -> float:
        """Median over the rounds of the process's CPU microseconds per record written."""
        values = [r["cpu"][process] / r["records"] * 1e6 for r in results[mode] if r["records"]]
        return statistics.median(values) if values else float("nan")

    def label(mode: str) -> str:
        return {
            "direct": f"direct (driver, {args.inflight} in flight)",
            "routed": "routed (3 sidecars)" + (", tracing off" if tracing_modes else ""),
            "routed+mtls": "routed (3 sidecars), mutual TLS",
        }.get(mode, f"routed (3 sidecars), tracing {mode.removeprefix('routed+trace')} sampled")

    print()
    print(f"{args.records} records of ~{args.record_size} B in {size}-record batches, {args.rounds} round(s)")
    print(
        "| pipeline | records/s (median) | p50 batch latency | p99 batch latency | CPU s per 100k records |"
    )
    print("|---|---|---|---|---|")
    for mode in modes:
        rs = results[mode]
        p50 = statistics.median(r["p50"] for r in rs) * 1000
        p99 = statistics.median(r["p99"] for r in rs) * 1000
        cpu = sum(v for r in rs for v in r["cpu"].values() if v == v) / (len(rs) * args.records / 100_000)
        print(f"| {label(mode)} | {median_rate(mode):,.0f} | {p50:.1f} ms | {p99:.1f} ms | {cpu:.2f} |")
    # CPU per record, per process: the services are the same programs in every mode; what differs is
    # who carries the batches between them (one driver, or a sidecar per service).
    processes = ["source", "transform", "sink", "driver", *SIDECARS]
    print()
    print(f"CPU us per record written, {size}-record batches (median of the rounds)")
    print("| pipeline | " + " | ".join(processes) + " | per sidecar hop (mean) | total |")
    print("|---|" + "---|" * (len(processes) + 2))
    totals: dict[str, float] = {}
    for mode in modes:
        cells = {p: us_per_record(mode, p) if p in results[mode][0]["cpu"] else None for p in processes}
        hops = [v for p, v in cells.items() if p in SIDECARS and v is not None]
        totals[mode] = sum(v for v in cells.values() if v is not None and v == v)
        row = " | ".join("" if v is None else f"{v:.1f}" for v in cells.values())
        hop = f"{statistics.mean(hops):.1f}" if hops else ""
        print(f"| {label(mode)} | {row} | {hop} | {totals[mode]:.1f} |")
    met = {True: "met", False: "NOT met"}
    if results.get("routed") and results.get("routed+mtls"):
        share = median_rate("routed+mtls") / median_rate("routed") if median_rate("routed") else 0.0
        print()
        print(f"mTLS / plaintext = {share:.0%} (target >= 85%): {met[share >= 0.85]}")
    plain_rate = median_rate("routed")
    for mode in tracing_modes:
        if mode != "routed" and results.get(mode) and plain_rate:
            print(f"{mode} / tracing off = {median_rate(mode) / plain_rate:.0%}")
    if results.get("direct") and results.get("routed"):
        direct, routed = median_rate("direct"), median_rate("routed")
        ratio = routed / direct if direct else 0.0
        hop_us = statistics.mean(us_per_record("routed", p) for p in SIDECARS)
        cpu_ratio = totals["routed"] / totals["direct"] if totals["direct"] else float("nan")
        p99_ratio = statistics.median(r["p99"] for r in results["routed"]) / statistics.median(
            r["p99"] for r in results["direct"]
        )
        print()
        print(f"routed / direct = {ratio:.0%} (target >= 60%): {met[ratio >= 0.6]}")
        print(f"routed = {routed:,.0f} records/s (target >= 50,000): {met[routed >= 50_000]}")
        print(f"sidecar hop = {hop_us:.1f} us CPU per record (target <= 2): {met[hop_us <= 2]}")
        print(f"routed CPU / direct CPU = {cpu_ratio:.2f} (target <= 1.15): {met[cpu_ratio <= 1.15]}")
        print(f"routed p99 / direct p99 = {p99_ratio:.1f} (target <= 2): {met[p99_ratio <= 2]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    sink = sub.add_parser("sink")
    sink.add_argument("--name", default="count")
    sink.add_argument("--port", type=int, required=True)
    sink.add_argument("--stats", type=Path, required=True)
    driver = sub.add_parser("driver")
    driver.add_argument("source")
    driver.add_argument("transform")
    driver.add_argument("sink")
    driver.add_argument("--inflight", type=int, default=4)
    driver.add_argument("--batch-size", type=int, default=1000)
    driver.add_argument("--out", type=Path, required=True)
    parser.add_argument("--records", type=int, default=300_000)
    parser.add_argument("--record-size", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--max-inflight",
        type=int,
        default=0,
        help="the source stage's max_inflight in the routed rounds (default: the sidecar's two windows)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[1000],
        help="records per batch; every size runs its own rounds (the tables come per size)",
    )
    parser.add_argument("--inflight", type=int, default=4, help="batches in flight in the direct chain")
    parser.add_argument("--modes", nargs="+", default=["direct", "routed"], choices=["direct", "routed"])
    parser.add_argument("--keep", action="store_true", help="keep the processes' logs")
    parser.add_argument(
        "--tls",
        choices=["off", "on", "both"],
        default="off",
        help="routed rounds with mutual TLS (both: A/B)",
    )
    parser.add_argument(
        "--tracing",
        nargs="+",
        metavar="off|RATIO",
        help="routed rounds per tracing setting, e.g. `--tracing off 0.01 1` (sampling ratios; spans go to an"
        " OTLP receiver in this process; needs the tracing extra)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="sample every routed-round process with `py-spy record --format raw` into this directory",
    )
    args = parser.parse_args()
    if args.command == "sink":
        run_sink(args.name, args.port, args.stats)
    elif args.command == "driver":
        from etlrouter.core.lifecycle import run_loop

        result = run_loop(
            lambda: drive(args.source, args.transform, args.sink, args.inflight, "true", args.batch_size)
        )
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(args.out)
    else:
        main_bench(args)


if __name__ == "__main__":
    main()
