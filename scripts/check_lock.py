#!/usr/bin/env python3
"""Check that the lock files agree with pyproject.toml, without resolving anything anew.

    python scripts/check_lock.py            # exit 1, naming each disagreement, when they differ

For every lock (requirements/*.lock, made by `make lock` with uv) and the extras it was made for:
- every requirement pyproject declares (with its markers) is pinned, at a version its specifier allows;
- every package the lock says came from pyproject ("# via etlrouter (pyproject.toml)") is still declared.
Upstream releases cannot make this check fail; only a change to pyproject or to a lock can.
"""

from __future__ import annotations

import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# Which extras each lock holds (the same list as the Makefile's `lock` target).
LOCKS = {
    "requirements/runtime.lock": ("connectors", "tracing"),
    "requirements/dev.lock": ("dev", "connectors", "tracing"),
}
PROJECT = "etlrouter"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;]+)")
_FROM_PYPROJECT = f"{PROJECT} (pyproject.toml)"


@dataclass(frozen=True)
class Pin:
    version: Version
    from_pyproject: bool


def read_lock(text: str) -> dict[str, list[Pin]]:
    """Package name -> its pins (a universal lock may pin one package twice, under different markers)."""
    pins: dict[str, list[Pin]] = {}
    name = ""
    for line in text.splitlines():
        match = _PIN.match(line)
        if match:
            name = canonicalize_name(match.group(1))
            pins.setdefault(name, []).append(Pin(Version(match.group(2)), False))
        elif name and _FROM_PYPROJECT in line:
            last = pins[name][-1]
            pins[name][-1] = Pin(last.version, True)
    return pins


def declared(pyproject: dict[str, object], extras: tuple[str, ...]) -> list[Requirement]:
    """The requirements pyproject declares for these extras, self-references (etlrouter[x]) expanded."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    found: list[Requirement] = [Requirement(r) for r in project.get("dependencies", [])]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in optional.get(extra, []):
            req = Requirement(text)
            if canonicalize_name(req.name) == PROJECT:
                todo.extend(req.extras)
            else:
                found.append(req)
    return found


def disagreements(pyproject: dict[str, object], lock_text: str, extras: tuple[str, ...]) -> list[str]:
    pins = read_lock(lock_text)
    problems: list[str] = []
    wanted = declared(pyproject, extras)
    for req in wanted:
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} is declared in pyproject.toml but not pinned in the lock")
            continue
        for pin in pins[name]:
            if not req.specifier.contains(pin.version, prereleases=True):
                problems.append(f"{req.name}=={pin.version} in the lock is outside pyproject's {req}")
    names = {canonicalize_name(r.name) for r in wanted}
    for name, versions in sorted(pins.items()):
        if any(p.from_pyproject for p in versions) and name not in names:
            problems.append(
                f"{name} is pinned as a pyproject requirement but pyproject no longer declares it"
            )
    return problems


def main() -> int:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    failed = False
    for relative, extras in LOCKS.items():
        path = ROOT / relative
        if not path.exists():
            print(f"{relative}: missing (run `make lock`)", file=sys.stderr)
            failed = True
            continue
        for problem in disagreements(pyproject, path.read_text(), extras):
            print(f"{relative}: {problem} (run `make lock`)", file=sys.stderr)
            failed = True
    if not failed:
        print(f"locks agree with pyproject.toml: {', '.join(LOCKS)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
