"""The controller framework: watches feed a de-duplicating work queue; workers run level-triggered reconciles.

- One watch per reconciler's plural, plus one per owned built-in kind (an event on an owned object enqueues
  its controlling owner's key). A watch lists first, then watches from the list's resourceVersion with
  bookmarks; on 410 Gone or any error it relists (with a capped backoff for errors). Every (re)list enqueues
  every object: whatever was missed while not watching is reconciled.
- The queue holds each (plural, key) at most once and never hands one key to two workers at once; an event
  for a key being reconciled marks it dirty and it runs again afterwards (client-go's workqueue rules).
- A reconcile that raises is retried after 0.5 s, 1 s, 2 s, ... capped at 60 s; success resets the backoff.
  `Result(requeue_after=s)` asks for another run after s seconds.
- Every `resync_s` every known key is enqueued again: drift of owned objects is repaired even without an
  event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from prometheus_client import Counter, Histogram

from etlrouter.client.router import RouterClient
from etlrouter.core.config import Config
from etlrouter.core.metrics import REGISTRY
from etlrouter.flow.retry import Backoff
from etlrouter.operator.inject import SidecarTls
from etlrouter.operator.kube import (
    KINDS,
    PLURAL_KINDS,
    ApiClient,
    KubeError,
    Resource,
    custom,
    list_objects,
    watch_lines,
)
from etlrouter.operator.tls_secrets import OperatorCredentials
from etlrouter.security.context import Security

log = logging.getLogger(__name__)

ObjectKey = tuple[str, str]  # (namespace, name)
WorkItem = tuple[str, ObjectKey]  # (plural, key)

RECONCILES = Counter(
    "etlrouter_operator_reconciles_total",
    "Reconciles run, by resource and outcome (ok, requeue, error).",
    ["plural", "outcome"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "etlrouter_operator_reconcile_seconds",
    "Time of one reconcile.",
    ["plural"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
WATCH_RESTARTS = Counter(
    "etlrouter_operator_watch_restarts_total",
    "Relists of a watch, by resource and cause (gone, error).",
    ["resource", "cause"],
    registry=REGISTRY,
)

# Failed reconciles and failed watches: 0.5 s doubling, capped at 60 s. No jitter: the queue holds a key
# once, an operator has few keys and watches, and the schedule stays the documented one.
BACKOFF = Backoff(base=0.5, cap=60.0, jitter=0.0)
WATCH_TIMEOUT_S = 300  # the server ends a watch after this; it is resumed from the last resourceVersion


class Result(NamedTuple):
    requeue_after: float | None = None


class Reconciler(Protocol):
    plural: str

    async def reconcile(self, key: ObjectKey) -> Result: ...


def default_router_client(address: str, security: Security | None = None) -> RouterClient:
    """A client of the router cluster at `address` ("host:port", or several joined by commas); `security`:
    the operator's credentials for a cluster that runs mutual TLS."""
    return RouterClient([a.strip() for a in address.split(",") if a.strip()], timeout=10.0, security=security)


@dataclass
class OperatorContext:
    api: ApiClient
    config: Config
    namespace: str = ""  # "" = all namespaces
    router_client: Callable[[str, Security | None], RouterClient] = field(default=default_router_client)
    # The operator's client certificates for the routers of TLS clusters (shared by the controllers).
    credentials: OperatorCredentials = field(default_factory=OperatorCredentials)
    # (namespace, cluster) -> the TLS settings a sidecar of that cluster is injected with; set by the
    # role once the webhook (which also serves the issuer) runs.
    sidecar_tls: Callable[[str, str], SidecarTls] | None = None


def controller_owner(obj: dict[str, Any]) -> tuple[str, str] | None:
    """(kind, name) of the object's controlling owner among the operator's kinds, else None."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and str(ref.get("apiVersion", "")).startswith("etlrouter.io/"):
            return str(ref.get("kind")), str(ref.get("name"))
    return None


class WorkQueue:
    """De-duplicating queue: an item is queued at most once and processed by one worker at a time."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[WorkItem] = asyncio.Queue()
        self._dirty: set[WorkItem] = set()
        self._processing: set[WorkItem] = set()
        self._timers: dict[WorkItem, asyncio.TimerHandle] = {}

    def add(self, item: WorkItem) -> None:
        timer = self._timers.pop(item, None)
        if timer is not None:
            timer.cancel()
        if item in self._dirty:
            return
        self._dirty.add(item)
        if item not in self._processing:
            self._queue.put_nowait(item)

    def add_after(self, item: WorkItem, delay: float) -> None:
        if item in self._dirty:
            return  # already due now
        old = self._timers.get(item)
        due = asyncio.get_running_loop().time() + delay
        if old is not None and old.when() <= due:
            return  # an earlier run is already planned
        if old is not None:
            old.cancel()
        self._timers[item] = asyncio.get_running_loop().call_at(due, self._fire, item)

    def _fire(self, item: WorkItem) -> None:
        self._timers.pop(item, None)
        self.add(item)

    async def get(self) -> WorkItem:
        item = await self._queue.get()
        self._processing.add(item)
        self._dirty.discard(item)
        return item

    def done(self, item: WorkItem) -> None:
        self._processing.discard(item)
        if item in self._dirty:
            self._queue.put_nowait(item)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def __len__(self) -> int:
        return self._queue.qsize()


class Manager:
    """Runs the watches, the queue and the workers of a set of reconcilers until stopped."""

    def __init__(
        self,
        ctx: OperatorContext,
        reconcilers: Sequence[Reconciler],
        *,
        workers: int = 4,
        resync_s: float = 60.0,
    ) -> None:
        self.ctx = ctx
        self.reconcilers = {r.plural: r for r in reconcilers}
        self.by_kind = {PLURAL_KINDS[r.plural]: r.plural for r in reconcilers if r.plural in PLURAL_KINDS}
        self.workers = workers
        self.resync_s = resync_s
        self.queue = WorkQueue()
        self.known: dict[str, set[ObjectKey]] = {plural: set() for plural in self.reconcilers}
        self._failures: dict[WorkItem, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # Set once every watch has listed: the operator has seen the whole state (readiness).
        self.synced = asyncio.Event()
        self._unsynced: set[str] = set()

    # -- lifecycle -------------------------------------------------------------------------------------

    def owned_resources(self) -> list[Resource]:
        seen: dict[tuple[str, str], Resource] = {}
        for r in self.reconcilers.values():
            for res in getattr(r, "owns", ()):
                seen.setdefault((res.api_version, res.plural), res)
        return list(seen.values())

    async def start(self) -> None:
        watches: list[tuple[Resource, Callable[[str, dict[str, Any]], None]]] = [
            (custom(plural), self._on_primary) for plural in self.reconcilers
        ]
        watches += [(res, self._on_owned) for res in self.owned_resources()]
        self._unsynced = {f"{res.api_version}/{res.plural}" for res, _ in watches}
        for res, handler in watches:
            self._tasks.append(asyncio.create_task(self._watch(res, handler), name=f"watch {res.plural}"))
        for i in range(self.workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"worker {i}"))
        self._tasks.append(asyncio.create_task(self._resync(), name="resync"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self.queue.close()

    # -- events ----------------------------------------------------------------------------------------

    def enqueue(self, plural: str, key: ObjectKey) -> None:
        if plural in self.reconcilers:
            self.queue.add((plural, key))

    def _on_primary(self, event_type: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        plural = _plural_of(obj)
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        if plural not in self.reconcilers:
            return
        if event_type == "DELETED":
            self.known[plural].discard(key)
        else:
            self.known[plural].add(key)
        self.enqueue(plural, key)

    def _on_owned(self, event_type: str, obj: dict[str, Any]) -> None:
        owner = controller_owner(obj)
        if owner is None:
            return
        kind, name = owner
        plural = self.by_kind.get(kind)
        if plural is not None:
            self.enqueue(plural, (str(obj["metadata"].get("namespace", "")), name))

    async def _watch(self, res: Resource, handler: Callable[[str, dict[str, Any]], None]) -> None:
        errors = 0
        label = f"{res.api_version}/{res.plural}"
        while True:
            try:
                items, rv = await list_objects(self.ctx.api, res, self.ctx.namespace)
                for obj in items:
                    if res.api_version.startswith("etlrouter.io/"):
                        obj.setdefault("kind", PLURAL_KINDS.get(res.plural))
                    handler("ADDED", obj)
                if label in self._unsynced:
                    self._unsynced.discard(label)
                    if not self._unsynced:
                        self.synced.set()
                errors = 0
                while True:  # each request ends after WATCH_TIMEOUT_S; resume from the last version seen
                    query = {
                        "resourceVersion": rv,
                        "allowWatchBookmarks": "true",
                        "timeoutSeconds": WATCH_TIMEOUT_S,
                    }
                    async for event in watch_lines(
                        self.ctx.api, res.path(self.ctx.namespace), query, timeout=WATCH_TIMEOUT_S + 30
                    ):
                        kind, obj = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":
                            raise KubeError(
                                int(obj.get("code", 0)), str(obj.get("reason")), str(obj.get("message"))
                            )
                        rv = str((obj.get("metadata") or {}).get("resourceVersion", rv))
                        if kind in ("ADDED", "MODIFIED", "DELETED"):
                            handler(str(kind), obj)
            except asyncio.CancelledError:
                raise
            except KubeError as e:
                if e.status == 410:  # our resourceVersion is too old: relist at once
                    WATCH_RESTARTS.labels(label, "gone").inc()
                    log.info("watch expired (410 Gone): relisting", extra={"fields": {"resource": label}})
                    continue
                errors += 1
                WATCH_RESTARTS.labels(label, "error").inc()
                log.warning("watch failed: %s", e, extra={"fields": {"resource": label}})
                await asyncio.sleep(BACKOFF.delay(errors))
            except Exception as e:
                errors += 1
                WATCH_RESTARTS.labels(label, "error").inc()
                log.warning("watch failed: %r", e, extra={"fields": {"resource": label}})
                await asyncio.sleep(BACKOFF.delay(errors))

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync_s)
            for plural, keys in self.known.items():
                for key in list(keys):
                    self.enqueue(plural, key)

    # -- work ------------------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            item = await self.queue.get()
            try:
                await self._run(item)
            finally:
                self.queue.done(item)

    async def _run(self, item: WorkItem) -> None:
        plural, key = item
        reconciler = self.reconcilers[plural]
        t0 = time.perf_counter()
        try:
            result = await reconciler.reconcile(key)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            failures = self._failures.get(item, 0) + 1
            self._failures[item] = failures
            delay = BACKOFF.delay(failures)
            RECONCILES.labels(plural, "error").inc()
            log.warning(
                "reconcile failed, retrying in %.1f s: %s",
                delay,
                e,
                exc_info=not isinstance(e, KubeError | TimeoutError | ConnectionError),
                extra={
                    "fields": {"resource": plural, "namespace": key[0], "name": key[1], "failures": failures}
                },
            )
            self.queue.add_after(item, delay)
            return
        finally:
            RECONCILE_SECONDS.labels(plural).observe(time.perf_counter() - t0)
        self._failures.pop(item, None)
        if result.requeue_after is not None:
            RECONCILES.labels(plural, "requeue").inc()
            self.queue.add_after(item, max(result.requeue_after, 0.0))
        else:
            RECONCILES.labels(plural, "ok").inc()


def _plural_of(obj: dict[str, Any]) -> str:
    return KINDS.get(str(obj.get("kind", "")), "")
