"""Watermarks: unit tests for the rules, property tests for monotonicity and the min-over-inputs bound."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etlrouter.flow.watermarks import (
    NO_WATERMARK,
    GraphError,
    PartitionWatermark,
    SourceWatermarks,
    StageWatermark,
    WatermarkGraph,
    WatermarkValve,
)


def test_partition_watermark_is_max_event_time_minus_lateness_and_never_decreases() -> None:
    partition = PartitionWatermark(allowed_lateness=5.0, idle_timeout=60.0, created_at=0.0)
    partition.observe(100.0, now=1.0)
    assert partition.value == 95.0
    partition.observe(90.0, now=2.0)  # an older batch does not pull it back
    assert partition.value == 95.0
    partition.observe(120.0, now=3.0)
    assert partition.value == 115.0


def test_lag_is_now_minus_watermark_and_undefined_before_any_data() -> None:
    assert StageWatermark().lag(now=10.0) is None
    assert StageWatermark(7.5).lag(now=10.0) == 2.5


def test_source_watermark_is_the_min_over_its_partitions() -> None:
    source = SourceWatermarks(allowed_lateness=0.0, idle_timeout=30.0)
    source.assign(0, now=0.0)
    source.assign(1, now=0.0)
    assert source.observe(0, 100.0, now=1.0).value == NO_WATERMARK  # partition 1 has said nothing yet
    assert source.observe(1, 80.0, now=2.0).value == 80.0
    assert source.observe(1, 150.0, now=3.0).value == 100.0


def test_an_idle_partition_stops_holding_back_and_does_not_pull_back_when_it_wakes() -> None:
    source = SourceWatermarks(allowed_lateness=0.0, idle_timeout=10.0)
    source.observe(0, 50.0, now=0.0)
    source.observe(1, 100.0, now=0.0)
    assert source.output.value == 50.0
    for t in range(1, 20):
        source.observe(1, 100.0 + t, now=float(t))
    # Partition 0 has been silent for more than 10 s: it no longer holds the source back.
    assert source.output == StageWatermark(119.0, idle=False)
    woke = source.observe(0, 60.0, now=20.0)  # wakes far behind
    assert woke.value == 119.0
    assert source.effective(0).value == 119.0  # raised to the output: its older records are late
    source.observe(1, 200.0, now=21.0)
    assert source.output.value == 119.0  # it holds the output again from the wake point
    source.observe(0, 130.0, now=22.0)
    assert source.output.value == 130.0


def test_all_inputs_idle_advances_to_the_max_and_marks_the_output_idle() -> None:
    source = SourceWatermarks(allowed_lateness=0.0, idle_timeout=10.0)
    source.observe(0, 50.0, now=0.0)
    source.observe(1, 100.0, now=0.0)
    assert source.advance(now=11.0) == StageWatermark(100.0, idle=True)


def test_an_assigned_partition_without_data_holds_back_only_until_idle_timeout() -> None:
    source = SourceWatermarks(allowed_lateness=0.0, idle_timeout=10.0)
    source.assign(1, now=0.0)
    source.observe(0, 50.0, now=1.0)
    assert source.output.value == NO_WATERMARK
    assert source.observe(0, 60.0, now=10.5).value == 60.0


def test_graph_fan_in_takes_the_min_and_fan_out_shares_the_value() -> None:
    graph = WatermarkGraph([("src_a", "join"), ("src_b", "join"), ("join", "sink1"), ("join", "sink2")])
    graph.set_source("src_a", StageWatermark(100.0))
    graph.set_source("src_b", StageWatermark(70.0))
    out = graph.propagate()
    assert out["join"].value == out["sink1"].value == out["sink2"].value == 70.0
    graph.set_source("src_b", StageWatermark(70.0, idle=True))
    assert graph.propagate()["sink2"].value == 100.0


def test_graph_rejects_cycles_and_unknown_sources() -> None:
    with pytest.raises(GraphError):
        WatermarkGraph([("a", "b"), ("b", "c"), ("c", "a")])
    graph = WatermarkGraph([("a", "b")])
    with pytest.raises(KeyError):
        graph.set_source("b", StageWatermark(1.0))


input_updates = st.lists(
    st.tuples(
        st.integers(0, 3),
        st.one_of(st.just(NO_WATERMARK), st.floats(0, 1000, allow_nan=False)),
        st.booleans(),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(updates=input_updates)
def test_valve_output_is_monotonic_and_bounded_by_every_active_input(
    updates: list[tuple[int, float, bool]],
) -> None:
    valve: WatermarkValve[int] = WatermarkValve(range(4))
    raw_max: dict[int, float] = dict.fromkeys(range(4), NO_WATERMARK)
    ever_idle: set[int] = set()
    previous = valve.output.value
    for key, value, idle in updates:
        raw_max[key] = max(raw_max[key], value)
        ever_idle |= {key} if idle else set()
        output = valve.update(key, StageWatermark(value, idle))
        assert output.value >= previous
        previous = output.value
        for other in range(4):
            effective = valve.effective(other)
            if not effective.idle:
                assert output.value <= effective.value
                if other not in ever_idle:
                    assert effective.value == raw_max[other]  # never-idle inputs are not adjusted
        if all(valve.effective(k).idle for k in range(4)):
            assert output.idle


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 2), st.floats(0, 500, allow_nan=False), st.floats(0, 8, allow_nan=False)),
        max_size=60,
    ),
    lateness=st.floats(0, 20, allow_nan=False),
)
def test_source_output_is_monotonic_and_bounded_by_non_idle_partitions(
    steps: list[tuple[int, float, float]], lateness: float
) -> None:
    source = SourceWatermarks(allowed_lateness=lateness, idle_timeout=10.0)
    now = 0.0
    for p in range(3):
        source.assign(p, now)
    previous = source.output.value
    for partition, event_time, dt in steps:
        now += dt
        output = source.observe(partition, event_time, now)
        assert output.value >= previous
        previous = output.value
        for p in range(3):
            if not source.partition(p).is_idle(now):
                assert output.value <= source.effective(p).value
                assert source.effective(p).value >= source.partition(p).value


@st.composite
def dags(draw: st.DrawFn) -> list[tuple[str, str]]:
    size = draw(st.integers(2, 7))
    edges = [
        (f"n{i}", f"n{j}")
        for j in range(1, size)
        # Node 1 always hangs off node 0; later nodes may have no parent, i.e. be further sources.
        for i in draw(st.sets(st.integers(0, j - 1), min_size=1 if j == 1 else 0, max_size=3))
    ]
    return edges


@settings(max_examples=150, deadline=None)
@given(edges=dags(), data=st.data())
def test_graph_outputs_are_monotonic_and_never_exceed_an_active_upstream(
    edges: list[tuple[str, str]], data: st.DataObject
) -> None:
    graph = WatermarkGraph(edges)
    sources = sorted(graph.sources)
    previous: dict[str, float] = {}
    for _ in range(data.draw(st.integers(1, 25))):
        source = data.draw(st.sampled_from(sources))
        value = data.draw(st.floats(0, 1000, allow_nan=False))
        graph.set_source(source, StageWatermark(value, data.draw(st.booleans())))
        outputs = graph.propagate()
        for node, output in outputs.items():
            assert output.value >= previous.get(node, -math.inf)
            previous[node] = output.value
            if node in graph.sources:
                continue
            for up in graph.upstream(node):
                effective = graph.effective_input(node, up)
                if not effective.idle:
                    assert output.value <= effective.value
                assert effective.value >= outputs[up].value


def test_revoking_the_leading_partition_does_not_move_the_output_backwards() -> None:
    source = SourceWatermarks(allowed_lateness=0.0, idle_timeout=10.0)
    source.observe(0, 50.0, now=0.0)
    for t in range(1, 15):
        source.observe(1, 100.0, now=float(t))
    assert source.output.value == 100.0  # partition 0 is idle, partition 1 leads
    assert source.revoke(1).value == 100.0  # only idle partition 0 (at 50) is left
