#!/usr/bin/env python3
"""grpclib throughput for 1000-record batches between two processes, with and without the h2 tuning.

    python benchmarks/transport.py [--batches 400] [--rounds 3] [--inflight 4]

A sink process serves SinkService.WriteBatch (decodes the batch, counts the records); this process sends
batches of 1000 records (16 B key, 200 B value, two string headers, an event time: ~290 KB) with a fixed
number of requests in flight. Variants alternate round by round (A/B/A/B) so machine noise hits both;
the table reports medians and the tuned/untuned ratios. CPU is measured per process from /proc.
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

from grpclib.server import Stream

from etlrouter._proto.v1 import records_pb2, services_grpc, services_pb2
from etlrouter.core import transport
from etlrouter.core.config import TransportConfig
from etlrouter.core.grpc import GrpcServer, open_channel
from etlrouter.core.lifecycle import run_loop

RECORDS_PER_BATCH = 1000
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


async def serve(port: int, tuned: bool) -> None:
    server = GrpcServer(
        [CountingSink()], host="127.0.0.1", port=port, transport_config=TransportConfig(h2_tuning=tuned)
    )
    await server.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def make_request() -> services_pb2.WriteBatchRequest:
    request = services_pb2.WriteBatchRequest()
    header = request.batch.header
    header.batch_id, header.record_count, header.source_id = "bench", RECORDS_PER_BATCH, "gen"
    for i in range(RECORDS_PER_BATCH):
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


async def drive(port: int, tuned: bool, batches: int, inflight: int, server_pid: int) -> dict[str, float]:
    config = TransportConfig(h2_tuning=tuned)
    transport.install(config)
    channel = open_channel(f"127.0.0.1:{port}", config)
    stub = services_grpc.SinkServiceStub(channel)
    request = make_request()
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
            assert reply.written == RECORDS_PER_BATCH

    server_cpu0, client_cpu0 = cpu_seconds(server_pid), time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    elapsed = time.perf_counter() - t0
    server_cpu, client_cpu = cpu_seconds(server_pid) - server_cpu0, time.process_time() - client_cpu0
    channel.close()
    latencies.sort()
    return {
        "records_per_s": batches * RECORDS_PER_BATCH / elapsed,
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


def run_variant(tuned: bool, batches: int, inflight: int) -> dict[str, float]:
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--tuned", str(int(tuned))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        return run_loop(lambda: drive(port, tuned, batches, inflight, child.pid))
    finally:
        child.terminate()
        child.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tuned", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        run_loop(lambda: serve(args.serve, bool(args.tuned)))
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
