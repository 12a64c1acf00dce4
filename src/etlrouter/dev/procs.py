"""Child processes of `etlrouter dev`: started with their logs in files, stopped in order with deadlines.

Every child runs in its own process group, so a Ctrl-C on the terminal reaches only dev, which then stops
the children in the order that drains the data plane (sidecars, then services, then routers). On Linux a
child also gets SIGKILL from the kernel if dev itself dies without stopping it (PR_SET_PDEATHSIG), so not
even `kill -9` of dev leaves a process behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _child_setup() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    prctl = libc.prctl

    def setup() -> None:  # runs in the child between fork and exec: no locks, no allocation-heavy work
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return setup


@dataclass
class Child:
    name: str
    group: str  # "router", "service" or "sidecar"
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


class Supervisor:
    """Starts children and stops them group by group: SIGTERM, wait up to a deadline, then SIGKILL."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        self._setup = _child_setup()
        self.hurry = threading.Event()  # set by a second signal: stop waiting for drains, kill

    def start(
        self, name: str, group: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                preexec_fn=self._setup,
            )
        child = Child(name, group, list(argv), log_path, proc)
        self.children.append(child)
        return child

    def pids(self) -> dict[str, int]:
        return {c.name: c.pid for c in self.children}

    def dead(self) -> list[Child]:
        return [c for c in self.children if not c.alive()]

    def stop(self, members: Sequence[Child], deadline_s: float) -> list[str]:
        """SIGTERM every live child of `members`, wait for all until the deadline, SIGKILL the rest.
        Returns the names of the children that had to be killed."""
        for child in members:
            if child.alive():
                child.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + deadline_s
        while any(c.alive() for c in members) and time.monotonic() < end and not self.hurry.is_set():
            time.sleep(0.05)
        killed: list[str] = []
        for child in members:
            if child.alive():
                child.proc.kill()
                killed.append(child.name)
            child.proc.wait()
        return killed

    def stop_all(self, steps: Sequence[tuple[Sequence[str], float]]) -> list[str]:
        """Stop the children step by step (each step: names, deadline), then anything not named."""
        killed: list[str] = []
        for names, deadline_s in steps:
            killed += self.stop([c for c in self.children if c.name in names], deadline_s)
        killed += self.stop([c for c in self.children if c.alive()], 0.0)
        return killed

    def tail(self, child: Child, lines: int = 15) -> str:
        try:
            text = child.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
