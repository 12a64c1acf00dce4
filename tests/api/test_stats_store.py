"""The leader's live-stats store (router/stats.py): rates from two reports, replicas summed, counter resets,
stale sidecars left out, where backpressure sits, when a sidecar counts as silent. Pure: no I/O."""

from __future__ import annotations

from etlrouter._proto.v1 import control_pb2
from etlrouter.router.convert import stage_sample_from_proto
from etlrouter.router.stats import (
    MAX_STAGES_PER_SIDECAR,
    EdgeSample,
    StageSample,
    StatsStore,
    silent,
)


def sample(at_ms: int, records_in: int, *edges: EdgeSample, **fields: int) -> StageSample:
    return StageSample(at_ms=at_ms, records_in=records_in, edges=tuple(edges), **fields)  # type: ignore[arg-type]


def edge(to: str, sent: int, starved: float = 0.0, oldest: float = 0.0, in_flight: int = 0) -> EdgeSample:
    return EdgeSample(
        to, sent, credits_available=100, starved_s=starved, in_flight=in_flight, oldest_in_flight_s=oldest
    )


def test_rates_come_from_the_last_two_reports_and_replicas_are_summed() -> None:
    store = StatsStore()
    store.record("a", 1000, [("d", "s", sample(1000, 100, edge("t", 100)))])
    store.record("b", 1000, [("d", "s", sample(1000, 0))])
    store.record("a", 2000, [("d", "s", sample(2000, 600, edge("t", 400)))])
    store.record("b", 2000, [("d", "s", sample(2000, 250))])
    snap = store.snapshot(2000, stale_after_ms=3000)
    [stage] = snap.stages
    assert (stage.replicas, stage.records_in, stage.records_in_per_s) == (2, 850, 750.0)
    assert stage.sidecars == ["a", "b"]
    [e] = snap.edges
    assert (e.from_stage, e.to_stage, e.records_sent, e.records_per_s) == ("s", "t", 400, 300.0)
    assert not e.backpressure


def test_a_counter_reset_gives_no_negative_rate_and_a_first_report_no_rate() -> None:
    store = StatsStore()
    store.record("a", 1000, [("d", "s", sample(1000, 500))])
    assert store.snapshot(1000, stale_after_ms=3000).stages[0].records_in_per_s == 0.0
    store.record("a", 2000, [("d", "s", sample(2000, 10))])  # the replica restarted
    assert store.snapshot(2000, stale_after_ms=3000).stages[0].records_in_per_s == 0.0


def test_reports_of_a_stale_sidecar_and_stages_no_longer_reported_are_left_out() -> None:
    store = StatsStore()
    store.record("a", 1000, [("d", "s", sample(1000, 1)), ("d", "u", sample(1000, 1))])
    store.record("b", 5000, [("d", "s", sample(5000, 7))])
    assert [(s.stage_id, s.sidecars) for s in store.snapshot(5000, stale_after_ms=3000).stages] == [
        ("s", ["b"])
    ]
    store.record("a", 5500, [("d", "s", sample(5500, 2))])  # stage u was revoked from a
    assert [s.stage_id for s in store.snapshot(5500, stale_after_ms=3000).stages] == ["s"]


def test_backpressure_sits_at_the_deepest_held_back_edge() -> None:
    store = StatsStore()
    # src -> mid starved half of the interval; mid -> sink has a batch unanswered for 3 s; mid -> other flows.
    store.record(
        "x", 0, [("d", "src", sample(0, 0, edge("mid", 0))), ("d", "mid", sample(0, 0, edge("sink", 0)))]
    )
    store.record(
        "x",
        1000,
        [
            ("d", "src", sample(1000, 0, edge("mid", 10, starved=0.6))),
            ("d", "mid", sample(1000, 0, edge("sink", 10, oldest=3.0, in_flight=2), edge("other", 50))),
        ],
    )
    edges = {(e.from_stage, e.to_stage): e for e in store.snapshot(1000, stale_after_ms=3000).edges}
    assert edges["src", "mid"].starved_ratio == 0.6
    assert edges["src", "mid"].backpressure and not edges["src", "mid"].origin
    assert edges["mid", "sink"].backpressure and edges["mid", "sink"].origin
    assert not edges["mid", "other"].backpressure


def test_watermark_is_the_lowest_replica_and_ack_offsets_the_lowest_per_partition() -> None:
    store = StatsStore()
    a = StageSample(at_ms=0, watermark_ms=5000, acked_offsets={0: 10, 1: 3})
    b = StageSample(at_ms=0, watermark_ms=4000, acked_offsets={0: 7})
    store.record("a", 9000, [("d", "s", a)])
    store.record("b", 9000, [("d", "s", b)])
    [stage] = store.snapshot(9000, stale_after_ms=3000).stages
    assert (stage.watermark_ms, stage.watermark_lag_ms, stage.acked_offsets) == (4000, 5000, {0: 7, 1: 3})


def test_silent_after_three_intervals_never_sooner_than_the_floor() -> None:
    assert not silent(None, None, 500)
    assert not silent(1400, 200, 500)  # below the 1.5 s floor
    assert silent(1600, 200, 500)
    assert not silent(14_000, 5000, 5000) and silent(15_001, 5000, 5000)
    assert silent(1600, None, 500)  # no observed interval yet: the configured one


def test_the_store_is_bounded_and_forgets_sidecars_after_the_retention() -> None:
    store = StatsStore(retention_ms=10_000)
    many = [("d", f"s{i}", sample(0, i)) for i in range(MAX_STAGES_PER_SIDECAR + 50)]
    store.record("a", 0, many)
    assert len(store.snapshot(0, stale_after_ms=1000).stages) == MAX_STAGES_PER_SIDECAR
    store.record("b", 20_000, [])
    assert set(store.seen()) == {"b"} and store.snapshot(20_000, stale_after_ms=10**9).stages == []


def test_from_proto_reads_every_new_field() -> None:
    report = control_pb2.StageReport(
        dag_id="d",
        stage_id="s",
        records_in=5,
        bytes_in=50,
        bytes_out=40,
        acked_records=4,
        acked_offsets={0: 3},
        last_error="x" * 5000,
        edges=[
            control_pb2.EdgeReport(
                to_stage_id="t",
                records_sent=5,
                credits_available=9,
                starved_seconds_total=1.5,
                in_flight_batches=2,
                oldest_in_flight_seconds=0.25,
            )
        ],
    )
    s = stage_sample_from_proto(report, 77)
    assert (s.at_ms, s.bytes_in, s.bytes_out, s.acked_records, dict(s.acked_offsets)) == (
        77,
        50,
        40,
        4,
        {0: 3},
    )
    assert len(s.last_error) == 1000
    assert s.edges == (EdgeSample("t", 5, 9, 1.5, 2, 0.25),)
