"""Credit-based backpressure for one data-plane edge, counted in records AND bytes.

Two halves of one protocol, both pure (no clocks, no I/O; time is an argument):

* `CreditSender` lives on the sending side of an edge. It holds the credits the receiver has granted
  and may send a batch only if the batch fits in both dimensions (`try_acquire`).
* `ReceiveBuffer` lives on the receiving side. It accounts for what it has granted and what it holds,
  and computes how much to grant back as batches drain (`on_received`, `on_consumed`).

Protocol::

    receiver: grant = buffer.open()                # the initial window, sent to the sender
    sender:   sender.grant(grant)
    sender:   if sender.try_acquire(r, b, now): send batch
    receiver: buffer.on_received(r, b)             # the batch is now buffered
    receiver: grant = buffer.on_consumed(r, b)     # the batch left the buffer; send `grant` back if non-empty

Invariant (checked by the property tests): in-flight + buffered <= capacity, in both dimensions, except
for *one* oversize batch. A batch larger than the whole window could never fit, so it is allowed only
when the window is completely free (nothing in flight, nothing buffered, every credit returned): the
sender then goes into debt (negative available credits) and the receiver grants nothing until that batch
is consumed. Without this rule a single large batch would deadlock the edge; with it, memory per edge is
bounded by max(capacity, largest batch), never by load.

Credits do not leak: once everything sent has been received and consumed, the sender's available credits
equal the window again.
"""

from __future__ import annotations

from dataclasses import dataclass


class CreditViolation(Exception):
    """The peer broke the credit protocol (sent beyond its credits, or granted beyond the window)."""


@dataclass(frozen=True, slots=True)
class Credits:
    """An amount of credit (or of buffered data): records and bytes."""

    records: int
    nbytes: int

    def __add__(self, other: Credits) -> Credits:
        return Credits(self.records + other.records, self.nbytes + other.nbytes)

    def __sub__(self, other: Credits) -> Credits:
        return Credits(self.records - other.records, self.nbytes - other.nbytes)

    def fits_in(self, other: Credits) -> bool:
        """True when this amount fits within `other` in both dimensions."""
        return self.records <= other.records and self.nbytes <= other.nbytes

    @property
    def is_zero(self) -> bool:
        return self.records == 0 and self.nbytes == 0


NO_CREDITS = Credits(0, 0)


def _check_amount(records: int, nbytes: int) -> None:
    if records < 0 or nbytes < 0:
        raise ValueError(f"credit amounts must be non-negative, got records={records} nbytes={nbytes}")


@dataclass(slots=True)
class StarvationStats:
    """How long a sender waited for credits. `total_seconds` excludes the current, still-open streak."""

    total_seconds: float = 0.0
    episodes: int = 0


class CreditSender:
    """The sender's view of one edge: credits granted by the receiver and not yet used.

    `window` is the receiver's buffer capacity, agreed when the edge opens; it is needed to recognise a
    completely free window (the oversize-batch rule). Available credits start at zero: nothing may be
    sent before the receiver's first grant.
    """

    def __init__(self, window: Credits) -> None:
        if window.records <= 0 or window.nbytes <= 0:
            raise ValueError(f"window must be positive in both dimensions, got {window}")
        self.window = window
        self._available_records = 0
        self._available_bytes = 0
        self._starved_since: float | None = None
        self.starvation = StarvationStats()
        self.batches_sent = 0
        self.oversize_batches_sent = 0

    @property
    def available(self) -> Credits:
        """Unused credits. Negative in a dimension while an oversize batch is outstanding."""
        return Credits(self._available_records, self._available_bytes)

    @property
    def window_is_free(self) -> bool:
        """Every credit has been returned: nothing in flight or buffered at the receiver."""
        return self._available_records == self.window.records and self._available_bytes == self.window.nbytes

    def grant(self, records: int, nbytes: int) -> None:
        """Add credits returned by the receiver. A grant beyond the window is a protocol violation."""
        _check_amount(records, nbytes)
        new_records = self._available_records + records
        new_bytes = self._available_bytes + nbytes
        if new_records > self.window.records or new_bytes > self.window.nbytes:
            raise CreditViolation(
                f"grant of ({records}, {nbytes}) would exceed the window {self.window} "
                f"(available {self.available})"
            )
        self._available_records = new_records
        self._available_bytes = new_bytes

    def can_acquire(self, records: int, nbytes: int) -> bool:
        """Whether a batch of this size may be sent now (without changing any state)."""
        _check_amount(records, nbytes)
        fits = records <= self._available_records and nbytes <= self._available_bytes
        # The oversize exception: a batch bigger than the window goes alone, into a free window.
        return fits or self.window_is_free

    def try_acquire(self, records: int, nbytes: int, now: float) -> bool:
        """Take credits for one batch if allowed; otherwise start (or continue) a starvation streak."""
        if not self.can_acquire(records, nbytes):
            self.mark_starved(now)
            return False
        if not Credits(records, nbytes).fits_in(self.available):
            self.oversize_batches_sent += 1
        self._available_records -= records
        self._available_bytes -= nbytes
        self.batches_sent += 1
        self._end_starvation(now)
        return True

    def mark_starved(self, now: float) -> None:
        """The sender wants to send and cannot (or chose not to wait): start the streak if not running."""
        if self._starved_since is None:
            self._starved_since = now

    def abandon_wait(self, now: float) -> None:
        """The sender stopped waiting without sending (e.g. shutdown): close the starvation streak."""
        self._end_starvation(now)

    def starved_for(self, now: float) -> float:
        """Length of the current starvation streak (0.0 when the sender is not waiting)."""
        return 0.0 if self._starved_since is None else max(0.0, now - self._starved_since)

    @property
    def starved_since(self) -> float | None:
        return self._starved_since

    def total_starved_seconds(self, now: float) -> float:
        """All time spent waiting for credits, including the current streak."""
        return self.starvation.total_seconds + self.starved_for(now)

    def reset(self) -> None:
        """The stream broke: credits granted on it are void; wait for the receiver's next `open()`."""
        self._available_records = 0
        self._available_bytes = 0

    def _end_starvation(self, now: float) -> None:
        if self._starved_since is not None:
            self.starvation.total_seconds += max(0.0, now - self._starved_since)
            self.starvation.episodes += 1
            self._starved_since = None


class ReceiveBuffer:
    """The receiver's accounting for one edge: a bounded buffer that grants back what it frees.

    `outstanding` is what the receiver has granted and not yet seen arrive (in flight, or unused at the
    sender). The receiver keeps `outstanding + buffered <= capacity`, so whatever the sender does within
    its credits, memory stays within `capacity` (plus one oversize batch, see the module docstring).

    `min_grant` batches small grants into fewer messages: credits are returned once at least that much is
    free in either dimension, or whenever the buffer is empty (so a waiting sender can never be stranded).
    """

    def __init__(self, capacity: Credits, min_grant: Credits = NO_CREDITS) -> None:
        if capacity.records <= 0 or capacity.nbytes <= 0:
            raise ValueError(f"capacity must be positive in both dimensions, got {capacity}")
        self.capacity = capacity
        self.min_grant = min_grant
        # Plain ints on the per-batch path: building a Credits per call would double the cost.
        self._outstanding_records = 0
        self._outstanding_bytes = 0
        self._buffered_records = 0
        self._buffered_bytes = 0
        self.batches_received = 0
        self.oversize_batches_received = 0

    @property
    def buffered(self) -> Credits:
        return Credits(self._buffered_records, self._buffered_bytes)

    @property
    def outstanding(self) -> Credits:
        """Granted and not yet received. Negative in a dimension while an oversize batch is buffered."""
        return Credits(self._outstanding_records, self._outstanding_bytes)

    def open(self) -> Credits:
        """Start (or restart, after a broken stream) the edge: returns the initial grant to send.

        Credits granted on a previous stream are void (the sender resets too); batches already buffered
        keep their room.
        """
        self._outstanding_records = 0
        self._outstanding_bytes = 0
        return self._take_free(force=True)

    def on_received(self, records: int, nbytes: int) -> None:
        """A batch arrived. Raises `CreditViolation` if the sender exceeded its credits."""
        _check_amount(records, nbytes)
        if records > self._outstanding_records or nbytes > self._outstanding_bytes:
            # Only legal as the oversize exception: the sender saw the whole window free.
            whole_window_free = (
                self._outstanding_records == self.capacity.records
                and self._outstanding_bytes == self.capacity.nbytes
                and self._buffered_records == 0
                and self._buffered_bytes == 0
            )
            if not whole_window_free:
                raise CreditViolation(
                    f"batch ({records}, {nbytes}) exceeds outstanding credits {self.outstanding}"
                )
            self.oversize_batches_received += 1
        self._outstanding_records -= records
        self._outstanding_bytes -= nbytes
        self._buffered_records += records
        self._buffered_bytes += nbytes
        self.batches_received += 1

    def on_consumed(self, records: int, nbytes: int) -> Credits:
        """A buffered batch left (delivered downstream). Returns the credits to grant back (maybe none)."""
        _check_amount(records, nbytes)
        if records > self._buffered_records or nbytes > self._buffered_bytes:
            raise ValueError(f"consumed ({records}, {nbytes}) but only {self.buffered} is buffered")
        self._buffered_records -= records
        self._buffered_bytes -= nbytes
        return self._take_free(force=self._buffered_records == 0 and self._buffered_bytes == 0)

    def _take_free(self, force: bool) -> Credits:
        if self._buffered_records > self.capacity.records or self._buffered_bytes > self.capacity.nbytes:
            # An oversize batch is buffered: it travels alone, so nothing is granted until it is consumed
            # (this matters after a reconnect, which voids the outstanding credits that would otherwise
            # keep the window shut).
            return NO_CREDITS
        free_records = max(0, self.capacity.records - self._outstanding_records - self._buffered_records)
        free_bytes = max(0, self.capacity.nbytes - self._outstanding_bytes - self._buffered_bytes)
        if free_records == 0 and free_bytes == 0:
            return NO_CREDITS
        worth_sending = free_records >= self.min_grant.records or free_bytes >= self.min_grant.nbytes
        if not (force or worth_sending):
            return NO_CREDITS
        self._outstanding_records += free_records
        self._outstanding_bytes += free_bytes
        return Credits(free_records, free_bytes)
