"""Credit protocol: unit tests for the rules, a hypothesis state machine for the invariants."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from etlrouter.flow.credits import NO_CREDITS, Credits, CreditSender, CreditViolation, ReceiveBuffer


def connected(window: Credits, min_grant: Credits = NO_CREDITS) -> tuple[CreditSender, ReceiveBuffer]:
    sender, receiver = CreditSender(window), ReceiveBuffer(window, min_grant)
    initial = receiver.open()
    sender.grant(initial.records, initial.nbytes)
    return sender, receiver


def test_nothing_may_be_sent_before_the_first_grant() -> None:
    sender = CreditSender(Credits(10, 1000))
    assert not sender.try_acquire(1, 1, now=0.0)


def test_a_batch_must_fit_in_both_records_and_bytes() -> None:
    sender, _ = connected(Credits(10, 1000))
    assert sender.try_acquire(6, 100, now=0.0)
    assert not sender.can_acquire(5, 100)  # records exhausted
    assert not sender.can_acquire(1, 901)  # bytes exhausted
    assert sender.try_acquire(4, 900, now=0.0)
    assert sender.available == Credits(0, 0)


def test_oversize_batch_goes_alone_into_a_free_window_and_the_debt_is_repaid() -> None:
    sender, receiver = connected(Credits(10, 1000))
    assert sender.try_acquire(1, 5000, now=0.0)  # bigger than the window, but the window was free
    assert sender.available == Credits(9, -4000)
    assert not sender.can_acquire(1, 1)  # in debt: nothing else until it drains
    receiver.on_received(1, 5000)
    assert receiver.buffered == Credits(1, 5000)
    grant = receiver.on_consumed(1, 5000)
    sender.grant(grant.records, grant.nbytes)
    assert sender.window_is_free
    assert sender.oversize_batches_sent == 1
    assert receiver.oversize_batches_received == 1


def test_oversize_batch_waits_while_anything_is_in_flight() -> None:
    sender, _ = connected(Credits(10, 1000))
    assert sender.try_acquire(1, 1, now=0.0)
    assert not sender.try_acquire(1, 5000, now=0.0)


def test_receiver_rejects_a_batch_beyond_its_credits() -> None:
    _, receiver = connected(Credits(10, 1000))
    receiver.on_received(5, 500)
    with pytest.raises(CreditViolation):
        receiver.on_received(6, 10)


def test_receiver_rejects_an_oversize_batch_unless_the_window_is_free() -> None:
    _, receiver = connected(Credits(10, 1000))
    receiver.on_received(1, 1)
    with pytest.raises(CreditViolation):
        receiver.on_received(1, 5000)


def test_sender_rejects_a_grant_beyond_the_window() -> None:
    sender, _ = connected(Credits(10, 1000))
    with pytest.raises(CreditViolation):
        sender.grant(1, 0)


def test_min_grant_batches_small_grants_but_an_empty_buffer_returns_everything() -> None:
    sender, receiver = connected(Credits(100, 10_000), min_grant=Credits(50, 5_000))
    for _ in range(4):
        assert sender.try_acquire(25, 2_500, now=0.0)
        receiver.on_received(25, 2_500)
    assert receiver.on_consumed(25, 2_500) == Credits(0, 0)  # 25 free: below the threshold, held back
    assert receiver.on_consumed(25, 2_500) == Credits(50, 5_000)  # 50 free: all of it returned at once
    assert receiver.on_consumed(25, 2_500) == Credits(0, 0)
    assert receiver.on_consumed(25, 2_500) == Credits(50, 5_000)  # buffer empty: always returned


def test_reconnect_voids_old_credits_and_keeps_room_for_buffered_batches() -> None:
    sender, receiver = connected(Credits(10, 1000))
    assert sender.try_acquire(4, 400, now=0.0)
    receiver.on_received(4, 400)
    assert sender.try_acquire(3, 300, now=0.0)  # lost in flight when the stream breaks
    sender.reset()
    grant = receiver.open()
    assert grant == Credits(6, 600)
    sender.grant(grant.records, grant.nbytes)
    assert sender.available == Credits(6, 600)


def test_starvation_is_measured_from_the_first_refusal_to_the_next_send() -> None:
    sender, receiver = connected(Credits(2, 1000))
    assert sender.try_acquire(2, 10, now=1.0)
    assert not sender.try_acquire(1, 10, now=2.0)
    assert not sender.try_acquire(1, 10, now=3.5)  # still the same streak
    assert sender.starved_for(4.0) == pytest.approx(2.0)
    receiver.on_received(2, 10)
    grant = receiver.on_consumed(2, 10)
    sender.grant(grant.records, grant.nbytes)
    assert sender.try_acquire(1, 10, now=5.0)
    assert sender.starved_for(6.0) == 0.0
    assert sender.starvation.total_seconds == pytest.approx(3.0)
    assert sender.starvation.episodes == 1
    assert sender.total_starved_seconds(7.0) == pytest.approx(3.0)


class CreditProtocol(RuleBasedStateMachine):
    """A sender and a receiver joined by two FIFO channels (batches one way, grants the other)."""

    @initialize(
        window_records=st.integers(1, 20),
        window_bytes=st.integers(1, 2_000),
        min_grant_fraction=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    )
    def open_edge(self, window_records: int, window_bytes: int, min_grant_fraction: float) -> None:
        self.window = Credits(window_records, window_bytes)
        min_grant = Credits(int(window_records * min_grant_fraction), int(window_bytes * min_grant_fraction))
        self.sender = CreditSender(self.window)
        self.receiver = ReceiveBuffer(self.window, min_grant)
        self.batches_in_flight: deque[Credits] = deque()
        self.buffered: deque[Credits] = deque()
        self.grants_in_flight: deque[Credits] = deque([self.receiver.open()])
        self.granted_total = Credits(0, 0)  # grants that reached the sender
        self.sent_total = Credits(0, 0)
        self.now = 0.0

    @rule(records=st.integers(0, 25), nbytes=st.integers(0, 2_500), dt=st.floats(0, 1))
    def send(self, records: int, nbytes: int, dt: float) -> None:
        self.now += dt
        batch = Credits(records, nbytes)
        was_free = self.sender.window_is_free
        model_available = self.granted_total - self.sent_total
        if self.sender.try_acquire(records, nbytes, self.now):
            # Never beyond granted credits, except the documented oversize case into a free window.
            assert batch.fits_in(model_available) or was_free
            self.sent_total = self.sent_total + batch
            self.batches_in_flight.append(batch)
        else:
            assert not batch.fits_in(model_available)

    @precondition(lambda self: bool(self.batches_in_flight))
    @rule()
    def deliver_batch(self) -> None:
        batch = self.batches_in_flight.popleft()
        self.receiver.on_received(batch.records, batch.nbytes)  # must not raise: the sender obeyed
        self.buffered.append(batch)

    @precondition(lambda self: bool(self.buffered))
    @rule()
    def consume_batch(self) -> None:
        batch = self.buffered.popleft()
        grant = self.receiver.on_consumed(batch.records, batch.nbytes)
        if not grant.is_zero:
            self.grants_in_flight.append(grant)

    @precondition(lambda self: bool(self.grants_in_flight))
    @rule()
    def deliver_grant(self) -> None:
        grant = self.grants_in_flight.popleft()
        self.sender.grant(grant.records, grant.nbytes)
        self.granted_total = self.granted_total + grant

    @rule()
    def reconnect(self) -> None:
        # The stream breaks: batches and grants in flight are lost (the batches will be redelivered
        # from the source), credits on the old stream are void, buffered batches keep their room.
        self.batches_in_flight.clear()
        self.grants_in_flight.clear()
        self.sender.reset()
        self.granted_total = self.sent_total
        self.grants_in_flight.append(self.receiver.open())

    @rule()
    def drain_everything_and_check_no_credit_leaked(self) -> None:
        while self.batches_in_flight or self.buffered or self.grants_in_flight:
            if self.batches_in_flight:
                self.deliver_batch()
            elif self.buffered:
                self.consume_batch()
            else:
                self.deliver_grant()
        assert self.sender.window_is_free
        assert self.sender.available == self.window

    @invariant()
    def sender_accounting_matches_the_model(self) -> None:
        assert self.sender.available == self.granted_total - self.sent_total

    @invariant()
    def memory_per_edge_is_bounded(self) -> None:
        # Empty batches hold no memory and take no credits, so they do not count against "alone".
        held = [b for b in (*self.batches_in_flight, *self.buffered) if not b.is_zero]
        total = Credits(sum(b.records for b in held), sum(b.nbytes for b in held))
        oversize_alone = len(held) == 1 and not held[0].fits_in(self.window)
        assert total.fits_in(self.window) or oversize_alone

    @invariant()
    def receiver_never_commits_beyond_capacity(self) -> None:
        committed = self.receiver.outstanding + self.receiver.buffered
        oversize_buffered = not self.receiver.buffered.fits_in(self.window)
        # With an oversize batch buffered, nothing more may be granted (outstanding <= 0).
        assert committed.fits_in(self.window) or (
            oversize_buffered and self.receiver.outstanding.fits_in(NO_CREDITS)
        )


CreditProtocol.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestCreditProtocol = CreditProtocol.TestCase
