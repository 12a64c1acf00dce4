"""Role entry points: thin wiring from a validated Config to the components that run."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from etlrouter.core.config import Config
from etlrouter.core.lifecycle import StartupError, run_loop, serve

EXIT_STARTUP_ERROR = 2  # like an invalid configuration: the operator has to change something

# The directories a role writes, with the setting that names each: checked before anything starts, so an
# unusable one is one line naming the setting rather than a traceback from deep inside the role.
_DATA_DIRS = {
    "router": lambda c: [(c.router.data_dir, "router.data_dir or --data-dir")],
    "sidecar": lambda c: [(c.sidecar.data_dir, "sidecar.data_dir")],
}


def run_role(role: str, config: Config) -> int:
    """Run a long-lived role until SIGTERM/SIGINT; returns the process exit code."""
    from etlrouter.core import tracing

    try:
        for directory, setting in _DATA_DIRS.get(role, lambda c: [])(config):
            check_data_dir(directory, setting)
        try:
            instances = {"sidecar": config.sidecar.id or os.uname().nodename, "router": config.router.node_id}
            tracing.setup_from(config.tracing, role, instances.get(role, ""))
        except (ValueError, tracing.TracingUnavailableError) as error:
            raise StartupError(str(error)) from None
        run_loop(lambda: _serve_role(role, config))
    except StartupError as error:
        print(f"etlrouter {role}: {error}", file=sys.stderr)
        return EXIT_STARTUP_ERROR
    finally:
        tracing.shutdown_tracing()  # exports the spans still buffered
    return 0


def check_data_dir(directory: str, setting: str) -> None:
    """Create `directory` if needed and prove it writable; StartupError naming the setting if not."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        # mkdir succeeds on an existing read-only directory (and root ignores modes): try a real write.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        if isinstance(error, FileExistsError) or (path.exists() and not path.is_dir()):
            reason = "exists and is not a directory"
        elif error.filename and os.fspath(error.filename) != os.fspath(path):
            reason = f"{reason}: {error.filename}"
        raise StartupError(f"cannot use data directory {directory}: {reason} (set by {setting})") from None


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
