"""Batch-sized buffers stay in the heap: allocating and freeing them costs no page faults once warm.

Each case runs in its own interpreter, since the thresholds are process-wide and glibc reads its
environment variables at start-up."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt thresholds")

# What a hop does to a 250 KB batch, roughly: a few copies alive at once (framing, reading, decoding).
CHURN = """
import os, resource, sys
from etlrouter.core.lifecycle import keep_batch_buffers_in_heap
applied = keep_batch_buffers_in_heap() if sys.argv[1] == "tuned" else None
data = os.urandom(250_000)
def churn(rounds):
    for _ in range(rounds):
        a = data[1:] + data[2:]
        b = bytes(bytearray(data))
        c = [data[i:] for i in range(1, 4)]
        del a, b, c
churn(20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn(200)
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 200)
"""


def churn(mode: str, **env: str) -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    return out[0], float(out[1])


def test_batch_buffers_are_reused_instead_of_mapped_and_faulted_in_again() -> None:
    applied, tuned = churn("tuned")
    _, default = churn("default")
    assert applied == "True"
    # glibc's defaults map and trim these buffers: hundreds of page faults per round.
    assert default > 100, default
    assert tuned < default / 20, (tuned, default)


def test_an_operators_malloc_environment_is_left_alone() -> None:
    applied, faults = churn("tuned", MALLOC_TRIM_THRESHOLD_="1000000")
    assert applied == "False"
    assert faults > 100, faults
