"""Status conditions (the Kubernetes convention), as pure functions over plain dicts."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

ConditionStatus = Literal["True", "False", "Unknown"]


def timestamp(now: datetime) -> str:
    """RFC 3339 in UTC with second precision, as the apiserver writes times."""
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    observed_generation: int,
    now: datetime,
) -> list[dict[str, Any]]:
    """A new list with condition `type_` set; the others are kept in order.

    lastTransitionTime changes only when the status changes, so it tells how long a state has lasted;
    reason, message and observedGeneration always follow the latest reconcile.
    """
    previous = next((c for c in conditions if c.get("type") == type_), None)
    since = timestamp(now)
    if previous is not None and previous.get("status") == status and previous.get("lastTransitionTime"):
        since = str(previous["lastTransitionTime"])
    updated = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": observed_generation,
    }
    if previous is None:
        return [*(dict(c) for c in conditions), updated]
    return [updated if c.get("type") == type_ else dict(c) for c in conditions]


def get_condition(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def is_true(conditions: list[dict[str, Any]], type_: str) -> bool:
    c = get_condition(conditions, type_)
    return c is not None and c.get("status") == "True"
