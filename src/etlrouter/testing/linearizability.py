"""A linearizability checker for key-value register histories (Wing & Gong, with Lowe's cache).

Histories are per-operation records with invoke and response times. Because registers on
different keys are independent, the history is split per key and each key is checked on its own
(P-compositionality), which keeps the search small.

An operation whose outcome is unknown (the client gave up, or its server crashed) has
`response = math.inf`: it may have taken effect at any point after its invocation, or never.
Reads with unknown outcome carry no information and should simply be left out of the history.
"""

from __future__ import annotations

import enum
import math
from collections import defaultdict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass


class OpKind(enum.Enum):
    WRITE = "write"
    READ = "read"


@dataclass(frozen=True, slots=True)
class Operation:
    """One client operation. `value` is the value written, or the value a read returned."""

    client: int
    kind: OpKind
    key: str
    value: Hashable
    invoke: float
    response: float = math.inf

    def __post_init__(self) -> None:
        if self.response <= self.invoke:
            raise ValueError(f"operation {self} must respond strictly after it is invoked")
        if self.kind is OpKind.READ and math.isinf(self.response):
            raise ValueError(f"read {self} has no response: leave unanswered reads out of the history")


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    key: str | None = None  # the first key whose sub-history is not linearizable
    operations: tuple[Operation, ...] = ()  # that key's sub-history, sorted by invocation

    def explain(self) -> str:
        if self.ok:
            return "history is linearizable"
        lines = [f"history for key {self.key!r} is not linearizable:"]
        lines.extend(
            f"  client {op.client}: {op.kind.value}({op.value!r}) [{op.invoke}, {op.response}]"
            for op in self.operations
        )
        return "\n".join(lines)


class _Node:
    __slots__ = ("is_call", "match", "next", "op_id", "prev")

    def __init__(self, op_id: int, is_call: bool) -> None:
        self.op_id = op_id
        self.is_call = is_call
        self.match: _Node | None = None  # a call's return node
        self.prev: _Node | None = None
        self.next: _Node | None = None


def _lift(call: _Node) -> None:
    """Remove a call and its return from the event list (the call is linearized)."""
    assert call.prev is not None and call.match is not None and call.match.prev is not None
    call.prev.next = call.next
    if call.next is not None:
        call.next.prev = call.prev
    ret = call.match
    ret.prev.next = ret.next  # type: ignore[union-attr]
    if ret.next is not None:
        ret.next.prev = ret.prev


def _unlift(call: _Node) -> None:
    ret = call.match
    assert ret is not None and ret.prev is not None and call.prev is not None
    ret.prev.next = ret
    if ret.next is not None:
        ret.next.prev = ret
    call.prev.next = call
    if call.next is not None:
        call.next.prev = call


def check_register(operations: Iterable[Operation], initial: Hashable = None) -> bool:
    """Is this single-register history linearizable, starting from `initial`?"""
    ops = list(operations)
    if not ops:
        return True
    events: list[tuple[float, int, _Node]] = []
    for op_id, op in enumerate(ops):
        call, ret = _Node(op_id, True), _Node(op_id, False)
        call.match = ret
        # At equal times a return sorts before a call: the operations do not overlap.
        events.append((op.invoke, 1, call))
        events.append((op.response, 0, ret))
    events.sort(key=lambda item: (item[0], item[1]))
    head = _Node(-1, False)
    previous = head
    for _, _, node in events:
        previous.next = node
        node.prev = previous
        previous = node

    state: Hashable = initial
    linearized = 0
    seen: set[tuple[int, Hashable]] = set()
    stack: list[tuple[_Node, Hashable]] = []
    entry = head.next
    while head.next is not None:
        assert entry is not None
        if entry.is_call:
            op = ops[entry.op_id]
            if op.kind is OpKind.WRITE:
                allowed, new_state = True, op.value
            else:
                allowed, new_state = state == op.value, state
            if allowed:
                new_linearized = linearized | (1 << entry.op_id)
                if (new_linearized, new_state) not in seen:
                    seen.add((new_linearized, new_state))
                    stack.append((entry, state))
                    state, linearized = new_state, new_linearized
                    _lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            # Reached the return of an operation that could not be linearized: backtrack.
            if not stack:
                return False
            call, state = stack.pop()
            linearized &= ~(1 << call.op_id)
            _unlift(call)
            entry = call.next
    return True


def check_kv_history(operations: Iterable[Operation], initial: Hashable = None) -> CheckResult:
    """Check a key-value history key by key; every key starts at `initial`."""
    by_key: dict[str, list[Operation]] = defaultdict(list)
    for op in operations:
        by_key[op.key].append(op)
    for key in sorted(by_key):
        ops = sorted(by_key[key], key=lambda op: (op.invoke, op.response))
        if not check_register(ops, initial):
            return CheckResult(ok=False, key=key, operations=tuple(ops))
    return CheckResult(ok=True)
