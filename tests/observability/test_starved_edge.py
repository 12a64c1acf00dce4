"""etlrouter_edge_starved_for_seconds, the starved-edge alert's metric: with a stalled sink the sender's
wait for credits shows at once and keeps growing (the _total counter only grows when a wait ends), and it
drops to 0 when the sink comes back."""

from __future__ import annotations

import asyncio

from etlrouter.core.metrics import REGISTRY
from etlrouter.sdk import serving
from tests.sidecar.test_engine import (
    KINDS,
    SINK,
    SOURCE,
    CountingSource,
    RecordingSink,
    assign,
    dag,
    sidecar,
    until,
)


def starved_for() -> dict[str, float]:
    return {
        s.labels["edge"]: s.value
        for metric in REGISTRY.collect()
        if metric.name == "etlrouter_edge_starved_for_seconds"
        for s in metric.samples
        if s.labels.get("dag") == "dag-1"
    }


async def test_a_stalled_sink_shows_as_a_growing_wait_for_credits() -> None:
    stall = asyncio.Event()
    source, sink = CountingSource(20_000), RecordingSink("left", stall=stall)
    async with (
        serving(source) as s1,
        serving(sink) as s2,
        sidecar("A", {"numbers": s1.address}, KINDS) as a,
        sidecar("B", {"left": s2.address}, KINDS) as b,
    ):
        spec = dag([("src", SOURCE, "numbers", ["l"], 0), ("l", SINK, "left", [], 0)])
        where = {"src": a, "l": b}
        await b.engine.assign(1, assign(spec, where, b))
        await a.engine.assign(1, assign(spec, where, a))
        edge = "src->l#0"
        await until(lambda: starved_for().get(edge, 0.0) > 0.2)  # the window (3000 records) is used up
        first = starved_for()[edge]
        await until(lambda: starved_for()[edge] > first + 0.2)  # and the wait goes on, without a break
        stall.set()
        await until(lambda: source.acked == 19_999)
        assert starved_for().get(edge, 0.0) == 0.0
