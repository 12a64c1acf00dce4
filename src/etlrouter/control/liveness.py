"""Leader-local soft state: when each sidecar last reported, its health and its load.

Not replicated: a new leader starts empty and, for a grace period, expires nobody, so sidecars that
were heartbeating the old leader have time to find the new one. Times are milliseconds passed in by
the caller (a monotonic clock in the router); nothing here reads a clock.

A sidecar expires when `now` is past both its last heartbeat plus `timeout_ms` and the leadership
start plus `grace_ms`. A sidecar the leader never heard from counts from when `expired` first saw it
registered: a registration commits (and wakes the control loop) before its handler records the
registration's own heartbeat, and that sidecar must not be judged silent since the election.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import msgspec

from etlrouter.control.placement import SidecarView

Health = Literal["unknown", "serving", "degraded", "not_serving"]


class LoadReport(msgspec.Struct, frozen=True, kw_only=True):
    """control.proto `SidecarLoad`."""

    records_per_second: float = 0.0
    buffer_utilization: float = 0.0
    cpu_seconds: float = 0.0
    rss_bytes: int = 0
    running_stages: int = 0


class SidecarPulse(msgspec.Struct, frozen=True, kw_only=True):
    last_heartbeat_ms: int
    health: Health
    load: LoadReport | None


class Liveness:
    def __init__(self, *, timeout_ms: int, grace_ms: int, leader_since_ms: int) -> None:
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be positive, got {timeout_ms}")
        if grace_ms < 0:
            raise ValueError(f"grace_ms must not be negative, got {grace_ms}")
        self.timeout_ms = timeout_ms
        self.grace_ms = grace_ms
        self.leader_since_ms = leader_since_ms
        self._pulses: dict[str, SidecarPulse] = {}
        self._first_seen: dict[str, int] = {}  # registered, never heard: when `expired` first saw it

    def become_leader(self, now_ms: int) -> None:
        """Start over: what an earlier term heard is stale, and the grace period starts now."""
        self.leader_since_ms = now_ms
        self._pulses.clear()
        self._first_seen.clear()

    def heartbeat(
        self, sidecar_id: str, now_ms: int, *, health: Health = "serving", load: LoadReport | None = None
    ) -> None:
        previous = self._pulses.get(sidecar_id)
        if previous is not None and now_ms < previous.last_heartbeat_ms:
            now_ms = previous.last_heartbeat_ms  # a reordered report must not make a sidecar older
        self._pulses[sidecar_id] = SidecarPulse(last_heartbeat_ms=now_ms, health=health, load=load)
        self._first_seen.pop(sidecar_id, None)

    def forget(self, sidecar_id: str) -> None:
        self._pulses.pop(sidecar_id, None)
        self._first_seen.pop(sidecar_id, None)

    def pulse(self, sidecar_id: str) -> SidecarPulse | None:
        return self._pulses.get(sidecar_id)

    def age_ms(self, sidecar_id: str, now_ms: int) -> int | None:
        """Milliseconds since the last heartbeat, or None when this leader has not heard one."""
        pulse = self._pulses.get(sidecar_id)
        return None if pulse is None else max(0, now_ms - pulse.last_heartbeat_ms)

    def deadline_ms(self, sidecar_id: str) -> int:
        """The last instant at which `sidecar_id` still counts as alive."""
        grace_end = self.leader_since_ms + self.grace_ms
        pulse = self._pulses.get(sidecar_id)
        if pulse is not None:
            return max(pulse.last_heartbeat_ms + self.timeout_ms, grace_end)
        first_seen = self._first_seen.get(sidecar_id)
        return grace_end if first_seen is None else max(first_seen + self.timeout_ms, grace_end)

    def expired(self, now_ms: int, registered: Iterable[str]) -> list[str]:
        """Registered sidecars silent past the timeout (never within the grace period), sorted."""
        registered = set(registered)
        for sidecar_id in registered:
            if sidecar_id not in self._pulses:
                self._first_seen.setdefault(sidecar_id, now_ms)
        for gone in self._first_seen.keys() - registered:
            del self._first_seen[gone]
        return sorted(sidecar_id for sidecar_id in registered if now_ms > self.deadline_ms(sidecar_id))

    def views(self, services: Mapping[str, frozenset[str]]) -> list[SidecarView]:
        """Placement's picture of the registered sidecars: services from the state, load from here.

        A DEGRADED sidecar counts as fully loaded; a NOT_SERVING one keeps its work but gets no more.
        """
        views: list[SidecarView] = []
        for sidecar_id, fronted in sorted(services.items()):
            pulse = self._pulses.get(sidecar_id)
            load = pulse.load if pulse else None
            utilization = load.buffer_utilization if load else 0.0
            if pulse is not None and pulse.health == "degraded":
                utilization = max(utilization, 1.0)
            views.append(
                SidecarView(
                    id=sidecar_id,
                    services=fronted,
                    load=utilization,
                    running_stages=load.running_stages if load else None,
                    accepting=pulse is None or pulse.health != "not_serving",
                )
            )
        return views
