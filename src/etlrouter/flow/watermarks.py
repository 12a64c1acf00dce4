"""Event-time watermarks: per source partition, per stage, and along a pipeline DAG.

Pure: event times and `now` are floats in the same unit (seconds since the epoch; the sidecar converts the
batch header's int64 event times). Nothing here reads a clock.

* `PartitionWatermark` - one source partition: max event time seen minus the allowed lateness, never
  decreasing. A partition that has seen nothing for longer than `idle_timeout` is *idle*.
* `WatermarkValve` - combines the watermarks of a stage's inputs (a source's partitions, or the upstream
  stages of a fan-in). The output is the minimum over the *active* inputs, clamped so it never decreases.
  Idle inputs do not hold the output back; if every input is idle, the output advances to the maximum
  over the inputs and is itself marked idle (as Flink's StatusWatermarkValve does), so downstream windows
  still close.
* Wake-up rule: when an idle input becomes active again with a watermark below the current output, its
  effective watermark is raised to that output. The output therefore never moves backwards, and the
  records of that input older than the output are simply late. Invariant (property-tested): the output
  never exceeds the effective watermark of any active input, and for an input that has never been idle
  the effective watermark is its own watermark.
* `SourceWatermarks` - a source node: partitions plus a valve, driven by observations and `now`.
* `WatermarkGraph` - a DAG given as edges; source nodes are set from outside, every other node is the
  valve over its upstream nodes, computed in topological order. Fan-out needs nothing special: every
  downstream node reads the same upstream output.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

NO_WATERMARK = -math.inf

InputKey = TypeVar("InputKey", bound=Hashable)


@dataclass(frozen=True, slots=True)
class StageWatermark:
    """A watermark as seen by a consumer: its value and whether its producer is idle."""

    value: float = NO_WATERMARK
    idle: bool = False

    def lag(self, now: float) -> float | None:
        """now - watermark; None while there is no watermark yet (nothing observed)."""
        return None if self.value == NO_WATERMARK else now - self.value


class PartitionWatermark:
    """The watermark of one source partition, from the event times observed on it."""

    def __init__(self, allowed_lateness: float, idle_timeout: float, created_at: float) -> None:
        if allowed_lateness < 0 or idle_timeout <= 0:
            raise ValueError("allowed_lateness must be >= 0 and idle_timeout > 0")
        self.allowed_lateness = allowed_lateness
        self.idle_timeout = idle_timeout
        self.max_event_time = NO_WATERMARK
        self.value = NO_WATERMARK
        # A partition that never receives data becomes idle `idle_timeout` after it was assigned.
        self.last_activity = created_at

    def observe(self, max_event_time: float, now: float) -> None:
        """A batch arrived whose largest event time is `max_event_time`."""
        self.last_activity = max(self.last_activity, now)
        if max_event_time > self.max_event_time:
            self.max_event_time = max_event_time
            self.value = max(self.value, max_event_time - self.allowed_lateness)

    def is_idle(self, now: float) -> bool:
        return now - self.last_activity > self.idle_timeout

    def current(self, now: float) -> StageWatermark:
        return StageWatermark(self.value, self.is_idle(now))


class WatermarkValve(Generic[InputKey]):
    """Combines input watermarks into one monotonic output (see the module docstring for the rules)."""

    def __init__(self, inputs: Iterable[InputKey] = ()) -> None:
        self._effective: dict[InputKey, float] = {}
        self._idle: dict[InputKey, bool] = {}
        self._output = StageWatermark()
        for key in inputs:
            self.add_input(key)

    @property
    def output(self) -> StageWatermark:
        return self._output

    def add_input(self, key: InputKey) -> None:
        """A new input starts active at the current output: it holds the output there until it speaks
        or becomes idle, and (like a waking input) cannot pull it back."""
        if key not in self._effective:
            self._effective[key] = self._output.value
            self._idle[key] = False

    def remove_input(self, key: InputKey) -> StageWatermark:
        self._effective.pop(key, None)
        self._idle.pop(key, None)
        return self._recompute()

    def effective(self, key: InputKey) -> StageWatermark:
        """The input's watermark as the valve uses it (raised to the output when it woke up)."""
        return StageWatermark(self._effective[key], self._idle[key])

    def update(self, key: InputKey, watermark: StageWatermark) -> StageWatermark:
        """Feed one input's latest watermark; returns the (possibly advanced) output."""
        self._apply(key, watermark)
        return self._recompute()

    def update_many(self, watermarks: Mapping[InputKey, StageWatermark]) -> StageWatermark:
        for key, watermark in watermarks.items():
            self._apply(key, watermark)
        return self._recompute()

    def _apply(self, key: InputKey, watermark: StageWatermark) -> None:
        if key not in self._effective:
            self.add_input(key)
        was_idle = self._idle[key]
        value = max(self._effective[key], watermark.value)
        if was_idle and not watermark.idle:
            # Waking up behind the output must not pull it back: this input's older records are late.
            value = max(value, self._output.value)
        self._effective[key] = value
        self._idle[key] = watermark.idle

    def _recompute(self) -> StageWatermark:
        if not self._effective:
            return self._output
        active = [value for key, value in self._effective.items() if not self._idle[key]]
        if active:
            candidate, idle = min(active), False
        else:
            candidate, idle = max(self._effective.values()), True
        self._output = StageWatermark(max(self._output.value, candidate), idle)
        return self._output


class SourceWatermarks:
    """A source node: its partitions' watermarks combined by a valve."""

    def __init__(self, allowed_lateness: float, idle_timeout: float) -> None:
        self.allowed_lateness = allowed_lateness
        self.idle_timeout = idle_timeout
        self._partitions: dict[int, PartitionWatermark] = {}
        self._valve: WatermarkValve[int] = WatermarkValve()

    def assign(self, partition: int, now: float) -> None:
        """The source now reads this partition (it holds the watermark back until data or idleness)."""
        if partition not in self._partitions:
            self._partitions[partition] = PartitionWatermark(self.allowed_lateness, self.idle_timeout, now)
            self._valve.add_input(partition)

    def revoke(self, partition: int) -> StageWatermark:
        self._partitions.pop(partition, None)
        return self._valve.remove_input(partition)

    def observe(self, partition: int, max_event_time: float, now: float) -> StageWatermark:
        """A batch from `partition` arrived; returns the source's output watermark."""
        self.assign(partition, now)
        self._partitions[partition].observe(max_event_time, now)
        return self.advance(now)

    def advance(self, now: float) -> StageWatermark:
        """Re-evaluate idleness at `now` (call on a timer too, so idle partitions stop holding back)."""
        return self._valve.update_many({key: p.current(now) for key, p in self._partitions.items()})

    @property
    def output(self) -> StageWatermark:
        return self._valve.output

    def partition(self, partition: int) -> PartitionWatermark:
        return self._partitions[partition]

    def effective(self, partition: int) -> StageWatermark:
        return self._valve.effective(partition)


class GraphError(ValueError):
    """The edges do not describe a DAG."""


class WatermarkGraph:
    """Watermark propagation along a pipeline DAG (fan-in: min over inputs; fan-out: shared output)."""

    def __init__(self, edges: Iterable[tuple[str, str]]) -> None:
        upstream: dict[str, list[str]] = {}
        for src, dst in edges:
            upstream.setdefault(src, [])
            if src not in upstream.setdefault(dst, []):
                upstream[dst].append(src)
        self._upstream = upstream
        self._order = _topological_order(upstream)
        self.sources = frozenset(node for node, ups in upstream.items() if not ups)
        self._source_values: dict[str, StageWatermark] = {node: StageWatermark() for node in self.sources}
        self._valves: dict[str, WatermarkValve[str]] = {
            node: WatermarkValve(ups) for node, ups in upstream.items() if ups
        }

    @property
    def order(self) -> list[str]:
        return list(self._order)

    def upstream(self, node: str) -> list[str]:
        return list(self._upstream[node])

    def set_source(self, node: str, watermark: StageWatermark) -> None:
        """Set a source node's output (monotonic: a lower value is ignored, idleness is taken as given)."""
        if node not in self.sources:
            raise KeyError(f"{node!r} is not a source node of this graph")
        previous = self._source_values[node]
        self._source_values[node] = StageWatermark(max(previous.value, watermark.value), watermark.idle)

    def propagate(self) -> dict[str, StageWatermark]:
        """Recompute every stage in topological order; returns every node's output."""
        outputs: dict[str, StageWatermark] = {}
        for node in self._order:
            if node in self.sources:
                outputs[node] = self._source_values[node]
            else:
                valve = self._valves[node]
                outputs[node] = valve.update_many({up: outputs[up] for up in self._upstream[node]})
        return outputs

    def effective_input(self, node: str, upstream: str) -> StageWatermark:
        return self._valves[node].effective(upstream)

    def output(self, node: str) -> StageWatermark:
        if node in self.sources:
            return self._source_values[node]
        return self._valves[node].output


def _topological_order(upstream: Mapping[str, list[str]]) -> list[str]:
    remaining = {node: len(ups) for node, ups in upstream.items()}
    downstream: dict[str, list[str]] = {node: [] for node in upstream}
    for node, ups in upstream.items():
        for up in ups:
            downstream[up].append(node)
    ready = sorted(node for node, count in remaining.items() if count == 0)
    order: list[str] = []
    while ready:
        node = ready.pop()
        order.append(node)
        for child in downstream[node]:
            remaining[child] -= 1
            if remaining[child] == 0:
                ready.append(child)
    if len(order) != len(upstream):
        raise GraphError("the pipeline graph has a cycle")
    return order
