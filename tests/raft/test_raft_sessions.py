from __future__ import annotations

import msgspec
import pytest

from etlrouter.raft.sessions import ClientSessions


def test_retried_command_is_recognised_and_answered_with_the_first_response() -> None:
    sessions = ClientSessions()
    assert not sessions.check("c1", 1).duplicate
    sessions = sessions.record("c1", 1, b"ok-1")
    retry = sessions.check("c1", 1)
    assert retry.duplicate and retry.response == b"ok-1"
    assert not sessions.check("c1", 2).duplicate
    assert not sessions.check("c2", 1).duplicate  # sessions are per client
    sessions = sessions.record("c1", 2, b"ok-2")
    assert sessions.check("c1", 1).stale


def test_sequences_must_increase_and_sessions_survive_encoding() -> None:
    sessions = ClientSessions().record("c1", 5, b"r")
    with pytest.raises(ValueError, match="not after the last applied 5"):
        sessions.record("c1", 5)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(sessions), type=ClientSessions)
    assert decoded == sessions
    assert decoded.check("c1", 5).duplicate
    assert not sessions.forget("c1").check("c1", 5).duplicate
