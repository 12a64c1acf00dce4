from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent


# Ports for test servers come from below the kernel's ephemeral range (32768-60999 here): a port picked by
# binding to 0 and releasing it can be taken by any outgoing connection before the server binds it. Each
# pytest process gets its own slice, picked by its pid, and never hands the same port out twice.
_PORT_LOW, _PORT_HIGH = 20000, 32000
_next_port = _PORT_LOW + (os.getpid() * 97) % (_PORT_HIGH - _PORT_LOW)


def free_port() -> int:
    global _next_port
    for _ in range(_PORT_HIGH - _PORT_LOW):
        port = _next_port
        _next_port = _PORT_LOW + (_next_port + 1 - _PORT_LOW) % (_PORT_HIGH - _PORT_LOW)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {_PORT_LOW} and {_PORT_HIGH}")


@pytest.fixture
def python() -> str:
    return sys.executable


def missing_dependency(why: str) -> NoReturn:
    """A system dependency of some tests is absent: skip them on a developer's machine, but fail under CI
    (`CI` set), where .ci/run installs it, so a skip can never pass for a green run."""
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)
