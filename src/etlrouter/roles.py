"""Role entry points: thin wiring from a validated Config to the components that run."""

from __future__ import annotations

from etlrouter.core.config import Config
from etlrouter.core.lifecycle import run_loop, serve


def run_role(role: str, config: Config) -> int:
    """Run a long-lived role until SIGTERM/SIGINT; returns the process exit code."""
    run_loop(lambda: _serve_role(role, config))
    return 0


async def _serve_role(role: str, config: Config) -> None:
    if role == "router":
        from etlrouter.router.role import RouterRole

        await serve(RouterRole(config), drain_deadline_s=5.0)
        return
    if role == "sidecar":
        from etlrouter.sidecar.role import SidecarRole

        await serve(SidecarRole(config), drain_deadline_s=config.sidecar.drain_timeout_ms / 1000)
        return
    if role == "operator":
        from etlrouter.operator.role import OperatorRole

        await serve(OperatorRole(config), drain_deadline_s=5.0)
        return
    raise ValueError(f"{role!r} is not a long-running role")
