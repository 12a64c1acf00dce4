"""Leader election on a coordination.k8s.io/v1 Lease, as client-go does it.

Only the holder of the Lease runs reconciles. A candidate takes the Lease when its holder has not renewed
it for `lease_duration_s` — measured on the candidate's own clock from when it last saw the record change,
so clocks need not agree. The holder renews every `retry_s`; if it cannot renew for `renew_deadline_s`
(shorter than the lease) it steps down *before* anyone else may take over. Every write carries the
resourceVersion it read, so two candidates never both win. A holder that stops cleanly releases the Lease
so a standby takes over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Gauge

from etlrouter.core.metrics import REGISTRY
from etlrouter.operator import kube
from etlrouter.operator.kube import ApiClient, KubeError, Resource

log = logging.getLogger(__name__)

LEASES = Resource("coordination.k8s.io/v1", "leases")
IS_LEADER = Gauge(
    "etlrouter_operator_leader", "1 while this operator holds the leader Lease.", registry=REGISTRY
)


def micro_time(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        api: ApiClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration_s: float = 15.0,
        on_started: Callable[[], Awaitable[None]],
        on_stopped: Callable[[], Awaitable[None]],
    ) -> None:
        self.api, self.namespace, self.name, self.identity = api, namespace, name, identity
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = lease_duration_s * 2 / 3
        self.retry_s = max(lease_duration_s / 7.5, 0.1)
        self.on_started, self.on_stopped = on_started, on_stopped
        self.is_leader = False
        self.holder = ""  # the holder last seen ("" = none)
        self.observed = asyncio.Event()  # set after the first look at the Lease: leader or standby
        self._seen: tuple[str, str] | None = None  # (holder, renewTime) last seen
        self._seen_at = 0.0  # monotonic time it was first seen
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="leader election")

    async def stop(self) -> None:
        """Stop competing; a holder steps down (stopping its work) and releases the Lease."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.is_leader:
            await self._step_down()
            with contextlib.suppress(Exception):
                await self._release()

    async def _run(self) -> None:
        last_renew = 0.0
        while True:
            try:
                held = await self._try_acquire_or_renew()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("lease update failed: %s", e, extra={"fields": {"lease": self.name}})
                held = None  # unknown: keep the current role until the deadline passes
            now = time.monotonic()
            if held:
                last_renew = now
                if not self.is_leader:
                    self.is_leader = True
                    IS_LEADER.set(1)
                    log.info("became the leader", extra={"fields": {"lease": self.name, "id": self.identity}})
                    await self.on_started()
            elif self.is_leader and (held is False or now - last_renew > self.renew_deadline_s):
                log.warning("lost the leader lease", extra={"fields": {"lease": self.name}})
                await self._step_down()
            self.observed.set()
            await asyncio.sleep(self.retry_s)

    async def _step_down(self) -> None:
        self.is_leader = False
        IS_LEADER.set(0)
        await self.on_stopped()

    async def _try_acquire_or_renew(self) -> bool:
        """True when this candidate holds the Lease after the attempt, False when another does."""
        now = datetime.now(UTC)
        lease = await kube.get(self.api, LEASES, self.namespace, self.name)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(now, transitions=0, acquired=micro_time(now)),
            }
            try:
                await kube.request(self.api, "POST", LEASES.path(self.namespace), body=body)
            except KubeError as e:
                if e.status == 409:  # another candidate created it first
                    return False
                raise
            self.holder = self.identity
            return True
        spec: dict[str, Any] = lease.get("spec") or {}
        holder = str(spec.get("holderIdentity") or "")
        record = (holder, str(spec.get("renewTime") or ""))
        if record != self._seen:
            self._seen, self._seen_at = record, time.monotonic()
        self.holder = holder
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration_s)
        expired = time.monotonic() > self._seen_at + duration
        if holder and holder != self.identity and not expired:
            return False
        transitions = int(spec.get("leaseTransitions") or 0)
        acquired = str(spec.get("acquireTime") or micro_time(now))
        if holder != self.identity:
            transitions += 1
            acquired = micro_time(now)
        lease["spec"] = self._spec(now, transitions=transitions, acquired=acquired)
        try:
            # PUT with the resourceVersion read above: a concurrent winner makes this a 409.
            await kube.request(self.api, "PUT", LEASES.path(self.namespace, self.name), body=lease)
        except KubeError as e:
            if e.status == 409:
                return False
            raise
        self.holder = self.identity
        return True

    def _spec(self, now: datetime, *, transitions: int, acquired: str) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(round(self.lease_duration_s), 1),
            "acquireTime": acquired,
            "renewTime": micro_time(now),
            "leaseTransitions": transitions,
        }

    async def _release(self) -> None:
        lease = await kube.get(self.api, LEASES, self.namespace, self.name)
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        lease["spec"] = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": 1}
        await kube.request(self.api, "PUT", LEASES.path(self.namespace, self.name), body=lease)
        log.info("released the leader lease", extra={"fields": {"lease": self.name}})
