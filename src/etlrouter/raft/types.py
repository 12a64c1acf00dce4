"""Raft data types shared by the pure core, storage and transport.

Everything here is a versioned msgspec Struct: it is what the WAL persists, what snapshots carry and
what the transport maps onto the RaftService protobuf messages. The core never sees a socket or a file;
it consumes and produces these values only.
"""

from __future__ import annotations

import enum

import msgspec

NodeId = str


class EntryKind(enum.IntEnum):
    NORMAL = 0  # an opaque command for the state machine (data may be empty: the leader's no-op)
    CONF_CHANGE = 1  # data is an encoded ConfChange


class Entry(msgspec.Struct, array_like=True, frozen=True):
    """One log entry. `array_like` keeps the WAL encoding compact (no field names)."""

    index: int
    term: int
    kind: EntryKind = EntryKind.NORMAL
    data: bytes = b""


class HardState(msgspec.Struct, array_like=True, frozen=True):
    """What must be durable before the node answers anything that depends on it."""

    term: int = 0
    vote: NodeId = ""
    commit: int = 0


class ConfState(msgspec.Struct, array_like=True, frozen=True):
    """Cluster membership. Voters decide elections and commitment; learners only replicate."""

    voters: tuple[NodeId, ...] = ()
    learners: tuple[NodeId, ...] = ()


class ConfChangeKind(enum.IntEnum):
    ADD_VOTER = 0
    ADD_LEARNER = 1
    REMOVE_NODE = 2


class ConfChange(msgspec.Struct, array_like=True, frozen=True):
    kind: ConfChangeKind
    node: NodeId
    address: str = ""  # where the transport reaches the node; replicated so every member learns it


class SnapshotMeta(msgspec.Struct, array_like=True, frozen=True):
    index: int
    term: int
    conf: ConfState
    addresses: dict[NodeId, str] = {}


class MessageType(enum.IntEnum):
    APPEND = 0  # AppendEntries (entries may be empty for a probe)
    APPEND_RESP = 1
    VOTE = 2
    VOTE_RESP = 3
    PRE_VOTE = 4
    PRE_VOTE_RESP = 5
    HEARTBEAT = 6
    HEARTBEAT_RESP = 7
    SNAPSHOT = 8  # InstallSnapshot: the transport streams the snapshot data in chunks
    SNAPSHOT_RESP = 9
    TIMEOUT_NOW = 10  # leadership transfer: campaign now, skipping pre-vote and the lease check


class Message(msgspec.Struct, array_like=True, frozen=True, kw_only=True):
    """One Raft message, etcd-raft style: a single type covers every RPC and its response."""

    type: MessageType
    sender: NodeId
    to: NodeId
    term: int
    log_term: int = 0  # APPEND: term of the entry at `index`; VOTE: candidate's last log term
    index: int = 0  # APPEND: index preceding `entries`; VOTE: candidate's last index; *_RESP: match/hint
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0  # APPEND_RESP on reject: the follower's last index (fast back-off)
    reject_term: int = 0  # APPEND_RESP on reject: term of the conflicting entry (fast back-off)
    context: bytes = b""  # HEARTBEAT(_RESP): ReadIndex request context; VOTE: transfer marker
    snapshot: SnapshotMeta | None = None  # SNAPSHOT: metadata; the data travels beside it
    snapshot_data: bytes = b""
