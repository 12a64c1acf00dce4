"""Change notifications for registry watchers (ServiceRegistry.Watch, GraphQL subscriptions).

After every applied entry that changed the replicated state, the hub compares a flat view of it
(kind/name -> JSON) with the previous one and sends each subscriber the objects that were put or deleted.
The view is computed only while someone is subscribed. A subscriber that falls too far behind is dropped
(its stream ends with an error) and resubscribes, starting again from a full listing: a slow watcher never
holds memory or the apply loop hostage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import msgspec

from etlrouter.control import ControlState

log = logging.getLogger(__name__)

EventType = Literal["put", "delete", "bookmark"]
Key = tuple[str, str]  # (kind, name)


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    type: EventType
    revision: int
    kind: str = ""
    name: str = ""
    json: str = ""


class SubscriberLaggedError(Exception):
    """The subscriber did not keep up; resubscribe to get a fresh listing."""


def view_of(state: ControlState) -> dict[Key, str]:
    view: dict[Key, str] = {}
    encode = msgspec.json.encode
    for instance in state.services():
        key = f"{instance.name}@{instance.sidecar_id or 'direct'}:{instance.endpoint}"
        view[("service", key)] = encode(instance).decode()
    for sidecar in state.sidecars():
        view[("sidecar", sidecar.id)] = encode(sidecar).decode()
    for pipeline in state.pipelines():
        view[("pipeline", pipeline.name)] = encode(pipeline).decode()
    return view


class WatchHub:
    def __init__(self, state: ControlState, *, queue_limit: int = 10_000) -> None:
        self.state = state
        self.queue_limit = queue_limit
        self._subscribers: set[asyncio.Queue[ChangeEvent | None]] = set()
        self._view: dict[Key, str] | None = None

    def changed(self) -> None:
        """Called after an applied entry changed the state (from the Raft apply loop)."""
        if not self._subscribers:
            self._view = None
            return
        new = view_of(self.state)
        old = self._view or {}
        revision = self.state.revision
        events = [
            ChangeEvent("put", revision, kind, name, body)
            for (kind, name), body in new.items()
            if old.get((kind, name)) != body
        ]
        events += [ChangeEvent("delete", revision, kind, name) for (kind, name) in old.keys() - new.keys()]
        self._view = new
        if events:
            self._broadcast([*events, ChangeEvent("bookmark", revision)])

    def _broadcast(self, events: list[ChangeEvent]) -> None:
        for queue in list(self._subscribers):
            if queue.qsize() + len(events) > self.queue_limit:
                self._subscribers.discard(queue)
                queue.put_nowait(None)  # tells the reader it lagged
                log.warning("dropping a registry watcher that fell behind")
                continue
            for event in events:
                queue.put_nowait(event)

    async def subscribe(self, kinds: frozenset[str] = frozenset()) -> AsyncIterator[ChangeEvent]:
        """The current objects (as puts), a bookmark, then every change. Filter by kind if given."""
        queue: asyncio.Queue[ChangeEvent | None] = asyncio.Queue()
        if self._view is None:
            self._view = view_of(self.state)
        revision = self.state.revision
        initial = [
            ChangeEvent("put", revision, kind, name, body) for (kind, name), body in self._view.items()
        ]
        self._subscribers.add(queue)
        try:
            for event in [*initial, ChangeEvent("bookmark", revision)]:
                if not kinds or event.kind in kinds or event.type == "bookmark":
                    yield event
            while True:
                item = await queue.get()
                if item is None:
                    raise SubscriberLaggedError("watcher fell behind; resubscribe")
                if not kinds or item.kind in kinds or item.type == "bookmark":
                    yield item
        finally:
            self._subscribers.discard(queue)
