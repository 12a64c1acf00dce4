"""A push source written with the SDK (`PushSource` served and a `Pusher` in this test process) through its
sidecar, a 3-router cluster and the sink's sidecar to a jsonl-file sink: the error before a pipeline reads
it, acks seen in order and covering everything, and no loss across a kill -9 of the sink service."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from etlrouter.sdk import Capabilities, Pusher, PushSource, Record, serving
from tests.e2e.processes import Processes, connector, jsonl_offsets, ready
from tests.e2e.test_pipeline import apply
from tests.e2e.test_push_helpers import push_sidecar
from tests.integration.cluster import RouterProcesses

BATCHES = 60
PER_BATCH = 100


class RecordingPusher(Pusher):
    """Remembers every ack the sidecar sent, in arrival order."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.acks_seen: list[int] = []

    def _acknowledge(self, offset: int) -> None:
        self.acks_seen.append(offset)
        super()._acknowledge(offset)


async def poll(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


async def test_pushed_records_reach_the_sink_acks_in_order_no_loss_across_a_sink_kill(
    system: tuple[RouterProcesses, Processes, Path],
) -> None:
    routers, procs, tmp = system
    out = tmp / "out.jsonl"
    source = PushSource()
    source.capabilities = Capabilities(name="pushed", push=True)
    async with serving(source) as host:
        sc_src, address = push_sidecar(procs, "sc-pushed", routers, [host.port])
        sink_port = connector(procs, "out", "jsonl_file_sink", "--path", str(out))
        sc_out, _ = push_sidecar(procs, "sc-out", routers, [sink_port])
        await poll(lambda: ready(sc_src) and ready(sc_out), 30, "sidecars registered")
        pusher = RecordingPusher(address, "pushed", first_offset=1000)
        async with pusher:
            await poll(lambda: "no pipeline reads source 'pushed'" in pusher.last_error, 30, "the error")
            assert not pusher.ready and pusher.offer([Record(b"k", b"v")]) is None

            await asyncio.to_thread(apply, routers, "pipeline pushed-out { source pushed | sink out }")
            await pusher.wait_ready(30)
            tickets = []
            for n in range(BATCHES):
                records = [Record(b"k%d" % i, b'{"n": %d}' % (n * PER_BATCH + i)) for i in range(PER_BATCH)]
                tickets.append(await pusher.push(records))
                if n == 20:
                    await poll(lambda: len(jsonl_offsets(out)) > 0, 30, "the first records in the sink")
                    procs.kill("out")  # kill -9 with batches in flight
                if n == 35:
                    procs.restart("out")
            await pusher.wait_acked(90)

        last = 1000 + BATCHES * PER_BATCH - 1
        assert [t.first_offset for t in tickets] == list(range(1000, last + 1, PER_BATCH))
        assert all(t.delivered.done() and t.delivered.exception() is None for t in tickets)
        assert pusher.acks_seen == sorted(pusher.acks_seen), "acks went backwards"
        assert pusher.acks_seen[-1] == last and pusher.acked == last
        written = jsonl_offsets(out)
        assert set(range(1000, last + 1)) <= set(written), "an acknowledged record is missing in the sink"
