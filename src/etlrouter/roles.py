"""Role entry points: thin wiring from a validated Config to the components that run."""

from __future__ import annotations

import logging

from etlrouter.core.config import Config
from etlrouter.core.lifecycle import run_loop, serve
from etlrouter.core.runtime import RoleRuntime

log = logging.getLogger(__name__)


def run_role(role: str, config: Config) -> int:
    """Run a long-lived role until SIGTERM/SIGINT; returns the process exit code."""
    run_loop(lambda: _serve_role(role, config))
    return 0


async def _serve_role(role: str, config: Config) -> None:
    if role == "router":
        cfg = config.router
        runtime = RoleRuntime(
            "router",
            grpc_listen=cfg.grpc,
            http_listen=cfg.http,
            transport_config=config.transport,
            readiness=lambda: (False, "the replicated control plane is not part of this build yet"),
        )
        drain_s = 5.0
    elif role == "sidecar":
        cfg_s = config.sidecar
        runtime = RoleRuntime(
            "sidecar",
            grpc_listen=cfg_s.grpc,
            http_listen=cfg_s.http,
            transport_config=config.transport,
            readiness=lambda: (False, "the data plane is not part of this build yet"),
        )
        drain_s = cfg_s.drain_timeout_ms / 1000
    elif role == "operator":
        from etlrouter.core.config import ListenConfig

        runtime = RoleRuntime(
            "operator",
            grpc_listen=ListenConfig(port=0),
            http_listen=config.operator.http,
            transport_config=config.transport,
            readiness=lambda: (False, "the CRD controllers are not part of this build yet"),
        )
        drain_s = 5.0
    else:
        raise ValueError(f"{role!r} is not a long-running role")
    await serve(runtime, drain_deadline_s=drain_s)
