"""A tiny driver for the control state: numbers log entries like Raft would."""

from __future__ import annotations

from etlrouter.control import (
    ApplyResult,
    ClientSession,
    Command,
    ControlState,
    RegisterSidecar,
    ServiceInstance,
    encode_command,
)
from etlrouter.dsl import StageKind

ORDERS = """\
# the orders feed
pipeline orders-to-s3 {
  source kafka-orders (batch_size = 500)
  | transform filter-valid (parallelism = 2)
  | sink s3-archive (flush = true)
}

pipeline orders-to-ch {
  source kafka-orders (batch_size = 500)
  | transform filter-valid (parallelism = 2)
  | sink clickhouse
}
"""

CLICKS = """\
pipeline clicks {
  source kafka-clicks
  | sink clickhouse
}
"""

SERVICES: dict[str, StageKind] = {
    "kafka-orders": "source",
    "kafka-clicks": "source",
    "filter-valid": "transform",
    "s3-archive": "sink",
    "clickhouse": "sink",
}


class Driver:
    """Applies commands at consecutive log indexes and keeps the log, to replay it elsewhere."""

    def __init__(self, state: ControlState | None = None, first_index: int = 1) -> None:
        self.state = state if state is not None else ControlState()
        self.index = first_index - 1
        self.log: list[tuple[int, bytes]] = []

    def raw(self, data: bytes) -> ApplyResult:
        self.index += 1
        self.log.append((self.index, data))
        return self.state.apply(self.index, data)

    def run(self, command: Command, session: ClientSession | None = None) -> ApplyResult:
        return self.raw(encode_command(command, session))

    def ok(self, command: Command, session: ClientSession | None = None) -> ApplyResult:
        result = self.run(command, session)
        assert result.error is None, result.error
        return result


def sidecar(sidecar_id: str, *services: str, address: str = "") -> RegisterSidecar:
    return RegisterSidecar(
        sidecar_id=sidecar_id,
        data_address=address or f"{sidecar_id}.pods:7000",
        services=tuple(ServiceInstance(name=name, kind=SERVICES[name]) for name in services),
    )


def register_all(driver: Driver, per_service: int = 1) -> None:
    """One sidecar per service (or `per_service` of them), named `<service>-<n>`."""
    for name in SERVICES:
        for n in range(per_service):
            driver.ok(sidecar(f"{name}-{n}", name))
