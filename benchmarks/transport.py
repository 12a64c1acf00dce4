#!/usr/bin/env python3
"""grpclib throughput for 1000-record batches between two processes, with and without the h2 tuning.

    python benchmarks/transport.py [--batches 400] [--rounds 3] [--inflight 4]
    python benchmarks/transport.py --relay [--batches 400] [--rounds 3]

A sink process serves SinkService.WriteBatch (decodes the batch, counts the records); this process sends
batches of 1000 records (16 B key, 200 B value, two string headers, an event time: ~290 KB) with a fixed
number of requests in flight. Variants alternate round by round (A/B/A/B) so machine noise hits both;
the table reports medians and the tuned/untuned ratios. CPU is measured per process from /proc.

--relay measures the floor of a forwarding hop: this process -> relay -> sink, where the relay (tuned)
receives WriteBatch with the records left encoded, makes the same call to the sink and answers with its
reply — one inbound and one outbound unary call per batch, nothing else. Batches of 1 record give its cost
per call, batches of 1000 its cost per record; a sidecar hop does at least this much (issue #20's 2 us per
record is measured against it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from grpclib.client import UnaryUnaryMethod
from grpclib.const import Handler
from grpclib.server import Stream

from etlrouter._proto.v1 import records_pb2, services_grpc, services_pb2
from etlrouter.core import transport
from etlrouter.core.config import TransportConfig
from etlrouter.core.grpc import GrpcServer, open_channel
from etlrouter.core.lifecycle import run_loop

RECORDS_PER_BATCH = 1000
WRITE_BATCH = "/etlrouter.v1.SinkService/WriteBatch"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class CountingSink(services_grpc.SinkServiceBase):
    def __init__(self) -> None:
        self.records = 0

    async def WriteBatch(self, stream: Stream[services_pb2.WriteBatchRequest, Any]) -> None:
        request = await stream.recv_message()
        assert request is not None
        n = len(request.batch.records.records)
        self.records += n
        await stream.send_message(services_pb2.WriteBatchResponse(written=n))

    async def Flush(self, stream: Stream[Any, Any]) -> None:
        await stream.send_message(services_pb2.FlushResponse())

    async def GetCapabilities(self, stream: Stream[Any, Any]) -> None:
        await stream.send_message(records_pb2.GetCapabilitiesResponse())


class Relay(CountingSink):
    """WriteBatch with the records left encoded (as a sidecar receives them), forwarded as it came."""

    def __init__(self, forward: int) -> None:
        super().__init__()
        self.channel = open_channel(f"127.0.0.1:{forward}")
        self.forward = UnaryUnaryMethod(
            self.channel, WRITE_BATCH, services_pb2.RawWriteBatchRequest, services_pb2.WriteBatchResponse
        )

    async def WriteBatch(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(await self.forward(request))

    def __mapping__(self) -> dict[str, Handler]:
        mapping = super().__mapping__()
        handler = mapping[WRITE_BATCH]
        mapping[WRITE_BATCH] = Handler(
            handler.func, handler.cardinality, services_pb2.RawWriteBatchRequest, handler.reply_type
        )
        return mapping


async def serve(port: int, tuned: bool, forward: int = 0) -> None:
    service = Relay(forward) if forward else CountingSink()
    server = GrpcServer(
        [service], host="127.0.0.1", port=port, transport_config=TransportConfig(h2_tuning=tuned)
    )
    await server.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def make_request(records: int = RECORDS_PER_BATCH) -> services_pb2.WriteBatchRequest:
    request = services_pb2.WriteBatchRequest()
    header = request.batch.header
    header.batch_id, header.record_count, header.source_id = "bench", records, "gen"
    for i in range(records):
        record = request.batch.records.records.add()
        record.key = f"key-{i:012d}".encode()
        record.value = bytes(200)
        record.headers["content-type"] = "application/octet-stream"
        record.headers["trace-id"] = f"{i:016x}"
        record.event_time_ms = 1_700_000_000_000 + i
        record.offset = i
    return request


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def drive(
    port: int, tuned: bool, batches: int, inflight: int, server_pid: int, records: int = RECORDS_PER_BATCH
) -> dict[str, float]:
    config = TransportConfig(h2_tuning=tuned)
    transport.install(config)
    channel = open_channel(f"127.0.0.1:{port}", config)
    stub = services_grpc.SinkServiceStub(channel)
    request = make_request(records)
    for _ in range(8):  # warm up the connection and both interpreters
        await stub.WriteBatch(request, timeout=30)
    remaining = batches
    latencies: list[float] = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            reply = await stub.WriteBatch(request, timeout=30)
            latencies.append(time.perf_counter() - t0)
            assert reply.written == records

    server_cpu0, client_cpu0 = cpu_seconds(server_pid), time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    elapsed = time.perf_counter() - t0
    server_cpu, client_cpu = cpu_seconds(server_pid) - server_cpu0, time.process_time() - client_cpu0
    channel.close()
    latencies.sort()
    return {
        "records_per_s": batches * records / elapsed,
        "server_cpu_ms_per_batch": 1000 * server_cpu / batches,
        "client_cpu_ms_per_batch": 1000 * client_cpu / batches,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1],
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int, tuned: bool, forward: int = 0) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            str(port),
            "--tuned",
            str(int(tuned)),
            "--forward",
            str(forward),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    return child


def run_variant(tuned: bool, batches: int, inflight: int) -> dict[str, float]:
    port = free_port()
    child = start_server(port, tuned)
    try:
        return run_loop(lambda: drive(port, tuned, batches, inflight, child.pid))
    finally:
        child.terminate()
        child.wait()


def run_relay(records: int, batches: int, inflight: int) -> dict[str, float]:
    """This process -> relay -> sink; the 'server' figures are the relay's."""
    sink_port, relay_port = free_port(), free_port()
    children = [start_server(sink_port, True)]
    try:
        children.append(start_server(relay_port, True, forward=sink_port))
        return run_loop(lambda: drive(relay_port, True, batches, inflight, children[1].pid, records))
    finally:
        for child in children:
            child.terminate()
            child.wait()


def main_relay(args: argparse.Namespace) -> None:
    sizes = (1, RECORDS_PER_BATCH)
    results: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
    for _ in range(args.rounds):
        for n in sizes:  # ten times the calls of one record: the same wall time, roughly
            results[n].append(run_relay(n, args.batches * (10 if n == 1 else 1), args.inflight))

    def us_per_batch(n: int) -> float:
        return statistics.median(r["server_cpu_ms_per_batch"] for r in results[n]) * 1000

    print(f"bare grpclib relay (tuned), {args.inflight} in flight, {args.rounds} rounds (medians)")
    print("| records per batch | records/s | relay CPU us per batch | relay CPU us per record |")
    print("|---|---|---|---|")
    for n in sizes:
        rate = statistics.median(r["records_per_s"] for r in results[n])
        print(f"| {n} | {rate:,.0f} | {us_per_batch(n):,.0f} | {us_per_batch(n) / n:,.2f} |")
    per_record = (us_per_batch(RECORDS_PER_BATCH) - us_per_batch(1)) / RECORDS_PER_BATCH
    print(f"per call pair (in + out) {us_per_batch(1):,.0f} us; per record beyond it {per_record:.2f} us")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tuned", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--forward", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--relay", action="store_true", help="the floor of a forwarding hop (see above)")
    args = parser.parse_args()
    if args.serve:
        run_loop(lambda: serve(args.serve, bool(args.tuned), args.forward))
        return
    if args.relay:
        main_relay(args)
        return

    size = len(make_request().batch.SerializeToString())
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for _ in range(args.rounds):
        for tuned in (False, True):
            results[tuned].append(run_variant(tuned, args.batches, args.inflight))

    def median(tuned: bool, key: str) -> float:
        return statistics.median(r[key] for r in results[tuned])

    print(
        f"grpclib, 2 processes, {RECORDS_PER_BATCH}-record batches of {size / 1000:.0f} KB, "
        f"{args.inflight} in flight, {args.batches} batches x {args.rounds} rounds (medians), "
        f"{os.cpu_count()} cores"
    )
    print(f"{'metric':<26}{'untuned':>12}{'h2 tuning':>12}{'ratio':>9}")
    for key, better in [
        ("records_per_s", "higher"),
        ("server_cpu_ms_per_batch", "lower"),
        ("client_cpu_ms_per_batch", "lower"),
        ("p50_ms", "lower"),
        ("p99_ms", "lower"),
    ]:
        base, tuned_value = median(False, key), median(True, key)
        print(f"{key:<26}{base:>12.2f}{tuned_value:>12.2f}{tuned_value / base:>8.2f}x  ({better} is better)")


if __name__ == "__main__":
    main()
