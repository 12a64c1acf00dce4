"""Cost of the flow-control bookkeeping per batch, against a trivial baseline in the same run.

    .venv/bin/python benchmarks/flow.py [--batches 100000] [--repeat 5]

Rows:
* baseline dict loop (twice: an A/A pair, so the spread between them shows the run's noise)
* ledger register + complete on 2 and 3 branches, in order and with completions arriving out of order
* credit round trip: sender acquire -> receiver on_received -> on_consumed -> sender grant

Each row is warmed up, then run `--repeat` times round-robin with the others; the best run counts
(least disturbed by the machine). Ratios are against baseline A. One batch is ~1000 records, so
divide by 1000 for the per-record cost.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable

from etlrouter.flow.credits import Credits, CreditSender, ReceiveBuffer
from etlrouter.flow.ledger import AckLedger, Outcome, SourcePartition

RECORDS_PER_BATCH = 1000
BYTES_PER_BATCH = 300_000


def baseline_dict_loop(batches: int) -> None:
    """What any per-batch bookkeeping costs at the least: insert a key, update it, delete it."""
    pending: dict[str, int] = {}
    ids = [f"b{i}" for i in range(batches)]
    for batch_id in ids:
        pending[batch_id] = 2
    for batch_id in ids:
        pending[batch_id] -= 1
        pending[batch_id] -= 1
        del pending[batch_id]


def ledger_in_order(branch_count: int) -> Callable[[int], None]:
    branches = [f"sink{i}" for i in range(branch_count)]

    def run(batches: int) -> None:
        ledger = AckLedger()
        partition = SourcePartition("bench", 0)
        ids = [f"b{i}" for i in range(batches)]
        acks = 0
        for i, batch_id in enumerate(ids):
            first = i * RECORDS_PER_BATCH
            ledger.register(
                batch_id, partition, first, first + RECORDS_PER_BATCH - 1, RECORDS_PER_BATCH, branches
            )
            for branch in branches:
                acks += len(ledger.complete(batch_id, branch, Outcome.WRITTEN))
        assert acks == batches and ledger.pending_batches() == 0

    return run


def ledger_out_of_order(branch_count: int, window: int = 64) -> Callable[[int], None]:
    """Completions of the last `window` batches arrive shuffled across batches and branches."""
    branches = [f"sink{i}" for i in range(branch_count)]

    def run(batches: int) -> None:
        ledger = AckLedger()
        partition = SourcePartition("bench", 0)
        rng = random.Random(1)
        reports: list[tuple[str, str]] = []
        for i in range(batches):
            batch_id = f"b{i}"
            first = i * RECORDS_PER_BATCH
            ledger.register(
                batch_id, partition, first, first + RECORDS_PER_BATCH - 1, RECORDS_PER_BATCH, branches
            )
            reports.extend((batch_id, branch) for branch in branches)
            if len(reports) >= window * branch_count:
                rng.shuffle(reports)
                for report in reports:
                    ledger.complete(report[0], report[1], Outcome.WRITTEN)
                reports.clear()
        for report in reports:
            ledger.complete(report[0], report[1], Outcome.WRITTEN)
        assert ledger.pending_batches() == 0

    return run


def credit_round_trip(batches: int) -> None:
    window = Credits(8 * RECORDS_PER_BATCH, 8 * BYTES_PER_BATCH)
    sender, receiver = CreditSender(window), ReceiveBuffer(window)
    initial = receiver.open()
    sender.grant(initial.records, initial.nbytes)
    now = 0.0
    for _ in range(batches):
        if not sender.try_acquire(RECORDS_PER_BATCH, BYTES_PER_BATCH, now):
            raise AssertionError("the window should never run dry in this loop")
        receiver.on_received(RECORDS_PER_BATCH, BYTES_PER_BATCH)
        grant = receiver.on_consumed(RECORDS_PER_BATCH, BYTES_PER_BATCH)
        sender.grant(grant.records, grant.nbytes)
    assert sender.window_is_free


def best_times(rows: list[tuple[str, Callable[[int], None]]], repeat: int, batches: int) -> list[float]:
    """Warm every row up once, then run the rows round-robin so drift in the machine hits all alike."""
    for _, work in rows:
        work(min(batches, 1000))
    best = [float("inf")] * len(rows)
    for _ in range(repeat):
        for index, (_, work) in enumerate(rows):
            start = time.perf_counter()
            work(batches)
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    rows: list[tuple[str, Callable[[int], None]]] = [
        ("baseline: dict insert/update/delete (A)", baseline_dict_loop),
        ("ledger register+complete, 2 branches", ledger_in_order(2)),
        ("ledger register+complete, 3 branches", ledger_in_order(3)),
        ("ledger, 3 branches, shuffled completions", ledger_out_of_order(3)),
        ("credit round trip (acquire/recv/consume/grant)", credit_round_trip),
        ("baseline: dict insert/update/delete (B)", baseline_dict_loop),
    ]
    print(f"python {sys.version.split()[0]}, {args.batches} batches per run, best of {args.repeat}")
    print(f"{'benchmark':<50} {'batches/s':>12} {'us/batch':>10} {'x baseline':>11}")
    times = best_times(rows, args.repeat, args.batches)
    for (name, _), seconds in zip(rows, times, strict=True):
        per_batch_us = seconds / args.batches * 1e6
        print(
            f"{name:<50} {args.batches / seconds:>12,.0f} {per_batch_us:>10.2f} {seconds / times[0]:>10.1f}x"
        )


if __name__ == "__main__":
    main()
