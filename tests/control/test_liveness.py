"""Leader-local heartbeat bookkeeping: timeouts, the grace period after election, load views."""

from __future__ import annotations

import pytest

from etlrouter.control import Liveness, LoadReport

TIMEOUT = 10_000
GRACE = 15_000


def fresh(leader_since: int = 1_000_000) -> Liveness:
    return Liveness(timeout_ms=TIMEOUT, grace_ms=GRACE, leader_since_ms=leader_since)


def test_a_sidecar_expires_only_when_silent_past_the_timeout() -> None:
    live = fresh(leader_since=0)
    live.heartbeat("a", 100_000)
    assert live.expired(100_000 + TIMEOUT, ["a"]) == []  # exactly at the timeout: still alive
    assert live.expired(100_000 + TIMEOUT + 1, ["a"]) == ["a"]
    live.heartbeat("a", 105_000)
    assert live.expired(100_000 + TIMEOUT + 1, ["a"]) == []
    assert live.age_ms("a", 107_500) == 2_500


def test_nobody_expires_during_the_grace_period_even_if_unknown_or_old() -> None:
    start = 1_000_000
    live = fresh(start)
    live.heartbeat("old", start - 60_000)  # heard long ago (e.g. just before a clock jump)
    registered = ["old", "never-heard"]
    assert live.expired(start, registered) == []  # the control loop's first round sees both
    assert live.expired(start + GRACE, registered) == []
    assert live.expired(start + GRACE + 1, registered) == ["never-heard", "old"]
    # A sidecar that reports during the grace period is then judged by its own timeout.
    live.heartbeat("never-heard", start + GRACE - 1)
    assert live.expired(start + GRACE + 1, registered) == ["old"]
    assert live.expired(start + GRACE - 1 + TIMEOUT, registered) == ["old"]
    assert live.expired(start + GRACE + TIMEOUT, registered) == ["never-heard", "old"]


def test_a_sidecar_registered_after_the_grace_period_gets_a_full_timeout_before_its_first_heartbeat() -> None:
    # The registration commits and wakes the control loop before its handler records the heartbeat
    # (the CI flake: "sidecar silent past the timeout" 18 ms before "registered", then unknown sinks).
    start = 0
    live = fresh(start)
    late = start + GRACE + 60_000
    assert live.expired(late, ["late"]) == []
    assert live.expired(late + TIMEOUT, ["late"]) == []
    assert live.expired(late + TIMEOUT + 1, ["late"]) == ["late"]
    # Deregistered and registered again later: counted afresh, not from the first sighting.
    assert live.expired(late + 2 * TIMEOUT, []) == []
    assert live.expired(late + 3 * TIMEOUT, ["late"]) == []


def test_becoming_leader_again_forgets_the_old_term_and_restarts_grace() -> None:
    live = fresh(0)
    live.heartbeat("a", 1_000)
    assert live.expired(50_000, ["a"]) == ["a"]
    live.become_leader(50_000)
    assert live.pulse("a") is None
    assert live.expired(50_000, ["a"]) == []  # the new leader's first round
    assert live.expired(50_000 + GRACE, ["a"]) == []
    assert live.expired(50_000 + GRACE + 1, ["a"]) == ["a"]


def test_only_registered_sidecars_are_reported_and_forgotten_ones_are_unknown() -> None:
    live = fresh(0)
    live.heartbeat("gone", 0)
    assert live.expired(GRACE + TIMEOUT + 1, []) == []
    live.forget("gone")
    assert live.age_ms("gone", 5) is None


def test_a_late_reordered_heartbeat_does_not_age_a_sidecar() -> None:
    live = fresh(0)
    live.heartbeat("a", 100_000)
    live.heartbeat("a", 90_000, health="degraded")
    pulse = live.pulse("a")
    assert pulse is not None and pulse.last_heartbeat_ms == 100_000 and pulse.health == "degraded"


def test_views_carry_load_and_health_for_placement() -> None:
    live = fresh(0)
    live.heartbeat("busy", 1, load=LoadReport(buffer_utilization=0.4, running_stages=3))
    live.heartbeat("sick", 1, health="degraded", load=LoadReport(buffer_utilization=0.1))
    live.heartbeat("down", 1, health="not_serving")
    services = {name: frozenset({"svc"}) for name in ("busy", "down", "quiet", "sick")}
    views = {view.id: view for view in live.views(services)}
    assert list(views) == ["busy", "down", "quiet", "sick"]
    assert (views["busy"].load, views["busy"].running_stages) == (0.4, 3)
    assert views["sick"].load == 1.0
    assert not views["down"].accepting and views["quiet"].accepting
    assert views["quiet"].running_stages is None and views["quiet"].services == frozenset({"svc"})


@pytest.mark.parametrize(("timeout", "grace", "needle"), [(0, 1, "timeout_ms"), (1, -1, "grace_ms")])
def test_bad_settings_are_named(timeout: int, grace: int, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Liveness(timeout_ms=timeout, grace_ms=grace, leader_since_ms=0)
