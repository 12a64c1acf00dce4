"""The pieces of live stats on a follower, without I/O: the leader's snapshot (stats + liveness) through its
proto and back unchanged, bounded on the way in; one fetch shared by concurrent readers (api/forward.py)."""

from __future__ import annotations

import asyncio

import pytest

from etlrouter._proto.v1 import admin_pb2
from etlrouter.api.forward import LiveFetch, SharedFetch
from etlrouter.control.liveness import Liveness, LoadReport
from etlrouter.router import convert as convert_module
from etlrouter.router.convert import live_stats_from_proto, live_stats_to_proto
from etlrouter.router.stats import (
    EdgeSample,
    LiveStats,
    StageSample,
    StatsStore,
    live_stats,
)


def leader_snapshot() -> LiveStats:
    store = StatsStore()
    liveness = Liveness(timeout_ms=3000, grace_ms=0, leader_since_ms=0)
    slow = EdgeSample("sink", 10, credits_available=0, starved_s=0.0, in_flight=1)
    stuck = EdgeSample("sink", 10, credits_available=0, starved_s=0.9, in_flight=1, oldest_in_flight_s=3.0)
    for at, records, edge in ((1000, 100, slow), (2000, 300, stuck)):
        store.record(
            "a",
            at,
            [
                (
                    "d",
                    "src",
                    StageSample(
                        at, records_out=records, watermark_ms=50_000, acked_offsets={0: 7}, edges=(edge,)
                    ),
                )
            ],
        )
        liveness.heartbeat("a", at, load=LoadReport(records_per_second=200.0, rss_bytes=5, running_stages=1))
    store.record("gone", 1500, [])
    return live_stats(
        store,
        liveness,
        ["a", "never-heard"],
        now_ms=2000,
        wall_ms=60_000,
        leader_id="router-1",
        stale_after_ms=3000,
        default_interval_ms=1000,
    )


def test_the_leaders_snapshot_survives_the_proto_unchanged() -> None:
    live = leader_snapshot()
    [stage] = live.stages
    assert (stage.records_out_per_s, stage.watermark_lag_ms) == (200.0, 10_000)  # wall clock, not monotonic
    [edge] = live.edges
    assert edge.backpressure and edge.origin and edge.records_per_s == 0.0
    assert [(s.sidecar_id, s.health, s.age_ms, s.silent, s.registered) for s in live.sidecars] == [
        ("a", "serving", 0, False, True),
        ("never-heard", "unknown", None, False, True),
        ("gone", "not_serving", 500, True, False),
    ]
    wire = admin_pb2.LiveStats.FromString(live_stats_to_proto(live).SerializeToString())
    assert live_stats_from_proto(wire) == live
    assert live_stats_from_proto(wire).edges[0].backpressure  # derived by the same rule on the follower


def test_a_forwarded_snapshot_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(convert_module, "MAX_FORWARDED_ITEMS", 2)
    reply = admin_pb2.LiveStats(edges=[admin_pb2.LiveEdgeStats() for _ in range(3)])
    with pytest.raises(ValueError, match=r"LiveStats.edges has 3 entries, at most 2"):
        live_stats_from_proto(reply)


class FakeLeader:
    """Counts fetches; each waits until released, so the test decides when the leader answers."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def fetch(self) -> LiveFetch:
        self.calls += 1
        await self.release.wait()
        return LiveFetch(None, "", f"answer {self.calls}")


async def test_concurrent_readers_share_one_fetch_and_reuse_it_while_young() -> None:
    now = [100.0]
    leader = FakeLeader()
    shared = SharedFetch(leader.fetch, clock=lambda: now[0])
    readers = [asyncio.ensure_future(shared.get(1.0)) for _ in range(5)]
    await asyncio.sleep(0)
    leader.release.set()
    answers = await asyncio.gather(*readers)
    assert leader.calls == 1 and {a.error for a in answers} == {"answer 1"}
    now[0] += 0.9
    assert (await shared.get(1.0)).error == "answer 1" and leader.calls == 1  # young enough: reused
    assert (await shared.get(0.5)).error == "answer 2"  # a reader that wants fresher data gets it
    now[0] += 1.0
    assert (await shared.get(1.0)).error == "answer 3" and shared.fetches == 3


async def test_a_reader_that_goes_away_does_not_cancel_the_others_fetch() -> None:
    leader = FakeLeader()
    shared = SharedFetch(leader.fetch)
    leaving, staying = asyncio.ensure_future(shared.get(1.0)), asyncio.ensure_future(shared.get(1.0))
    await asyncio.sleep(0)
    leaving.cancel()
    leader.release.set()
    assert (await staying).error == "answer 1" and leader.calls == 1
