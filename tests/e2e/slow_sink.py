"""An SDK sink for the backpressure tests, run as its own process:

    python -m tests.e2e.slow_sink --name slow --port P --stats FILE --records-per-second 1000
    python -m tests.e2e.slow_sink --name stuck --port P --stats FILE --stall

It writes one batch at a time (concurrent WriteBatch calls queue behind a lock) and sleeps
len(batch) / records-per-second per batch, so its throughput is bounded whatever the sidecar's
concurrency. With --stall a WriteBatch never returns. After every batch it replaces FILE with
{"records": <written so far>, "batches": <count>}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Mapping
from pathlib import Path

from etlrouter.sdk import Capabilities, Record, Sink, Written, run


class SlowSink(Sink):
    def __init__(self, name: str, stats: Path, records_per_second: float, stall: bool) -> None:
        self.capabilities = Capabilities(name=name, version="test")
        self.stats = stats
        self.records_per_second = records_per_second
        self.stall = stall
        self.records = 0
        self.batches = 0
        self._lock = asyncio.Lock()

    async def write(self, batch_id: str, records: list[Record], options: Mapping[str, str]) -> Written | None:
        if self.stall:
            await asyncio.Event().wait()  # never answers
        async with self._lock:
            await asyncio.sleep(len(records) / self.records_per_second)
            self.records += len(records)
            self.batches += 1
            tmp = self.stats.with_name(self.stats.name + ".tmp")
            tmp.write_text(json.dumps({"records": self.records, "batches": self.batches}))
            tmp.replace(self.stats)
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--records-per-second", type=float, default=1000.0)
    parser.add_argument("--stall", action="store_true")
    args = parser.parse_args()
    sink = SlowSink(args.name, args.stats, args.records_per_second, args.stall)
    run(sink, host="127.0.0.1", port=args.port, drain_deadline_s=1.0, log_format="json")


if __name__ == "__main__":
    main()
