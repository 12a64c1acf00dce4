"""Exactly-once application of client commands on top of Raft's at-least-once delivery.

A client that times out retries its proposal, so the same command can be committed twice. The
replicated state machine deduplicates with a per-client session: each command carries
(client_id, sequence); sequences of one client are issued one at a time and increase. The table is
part of the state machine's state (include it in snapshots), so every replica decides the same.

Usage inside the state machine's apply():

    verdict = sessions.check(cmd.client_id, cmd.sequence)
    if verdict.duplicate: return verdict.response        # already applied: answer the same
    if verdict.stale: return error                       # older than the last one: client bug
    response = really_apply(cmd)
    sessions = sessions.record(cmd.client_id, cmd.sequence, response)
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec


class SessionRecord(msgspec.Struct, array_like=True, frozen=True):
    sequence: int
    response: bytes = b""


class ClientSessions(msgspec.Struct, frozen=True, tag="raft.sessions.v1"):
    """Last applied sequence (and its response) per client. Immutable: `record` returns a new table."""

    clients: dict[str, SessionRecord] = {}

    def check(self, client_id: str, sequence: int) -> Verdict:
        last = self.clients.get(client_id)
        if last is None or sequence > last.sequence:
            return Verdict(duplicate=False, stale=False)
        if sequence == last.sequence:
            return Verdict(duplicate=True, stale=False, response=last.response)
        return Verdict(duplicate=False, stale=True)

    def record(self, client_id: str, sequence: int, response: bytes = b"") -> ClientSessions:
        last = self.clients.get(client_id)
        if last is not None and sequence <= last.sequence:
            raise ValueError(
                f"client session {client_id!r}: sequence {sequence} is not after "
                f"the last applied {last.sequence}"
            )
        return ClientSessions({**self.clients, client_id: SessionRecord(sequence, response)})

    def forget(self, client_id: str) -> ClientSessions:
        """Drop a finished client's session (a replicated decision, e.g. an expiry command)."""
        return ClientSessions({k: v for k, v in self.clients.items() if k != client_id})


@dataclass(frozen=True, slots=True)
class Verdict:
    duplicate: bool  # this exact command was applied: return `response`, do not apply again
    stale: bool  # older than the last applied command of this client: reject it
    response: bytes = b""
