"""Pusher's reconnect schedule (the stream itself is tested end to end in tests/e2e/test_push_source.py)."""

from __future__ import annotations

import pytest

from etlrouter.sdk.push import Pusher


def test_reconnects_back_off_from_a_tenth_of_a_second_to_reconnect_max_s() -> None:
    backoff = Pusher("127.0.0.1:1", "clicks")._reconnect
    assert [backoff.delay(n) for n in range(1, 8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert Pusher("127.0.0.1:1", "clicks", reconnect_max_s=10.0)._reconnect.delay(20) == 10.0
    assert Pusher("127.0.0.1:1", "clicks", reconnect_max_s=0.05)._reconnect.delay(1) == 0.05


def test_reconnect_max_s_must_be_positive() -> None:
    with pytest.raises(ValueError, match="reconnect_max_s"):
        Pusher("127.0.0.1:1", "clicks", reconnect_max_s=0)
