"""An SDK sink for the dashboard tests, run as its own process, that can be stalled from outside:

    python -m tests.dashboard.stallable_sink --name warehouse --port P --stall-file FILE

While FILE exists, WriteBatch calls do not return (a sink stuck on a lock, say) while the service itself
stays up and answers health checks and discovery, so its sidecar keeps it registered and the stall shows as
credit starvation on the edge into it. Written records are counted in memory only.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping
from pathlib import Path

from etlrouter.sdk import Capabilities, Record, Sink, Written, run


class StallableSink(Sink):
    def __init__(self, name: str, stall_file: Path) -> None:
        self.capabilities = Capabilities(name=name, version="test")
        self.stall_file = stall_file
        self.records = 0

    async def write(self, batch_id: str, records: list[Record], options: Mapping[str, str]) -> Written | None:
        while self.stall_file.exists():
            await asyncio.sleep(0.05)
        self.records += len(records)
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stall-file", type=Path, required=True)
    args = parser.parse_args()
    run(StallableSink(args.name, args.stall_file), host="127.0.0.1", port=args.port, drain_deadline_s=1.0)


if __name__ == "__main__":
    main()
