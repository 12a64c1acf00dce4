#!/usr/bin/env python3
"""Build the sdist and the wheel with build isolation; fail on a warning about the project's own metadata.

    python scripts/check_packaging.py [--outdir DIR]

Build isolation means the pinned `[build-system] requires` is what builds, as on a fresh machine. What
counts as ours: setuptools' deprecation and configuration warnings (they name pyproject.toml settings and a
date after which the build breaks, as `project.license` as a TOML table did). Not ours, and not failed on:
pip's notes about this machine's index locations, and setuptools' "byte-compiling is disabled" (an
environment setting).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Warning classes setuptools raises for project configuration (see setuptools.warnings); any "deprecated".
_OURS = re.compile(
    r"SetuptoolsDeprecationWarning|SetuptoolsWarning|BuildBackendWarning|InformationOnly|"
    r"_DeprecatedConfig|\bdeprecated\b|will no longer be supported",
    re.IGNORECASE,
)
_NOT_OURS = re.compile(r"is ignored: it is neither a file nor a directory|byte-compiling is disabled")


def project_warnings(output: str) -> list[str]:
    """The lines of a build log that warn about the project's own metadata or configuration."""
    return [line.strip() for line in output.splitlines() if _OURS.search(line) and not _NOT_OURS.search(line)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--outdir", type=Path, help="where to leave the sdist and wheel (default: a temp dir)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        outdir = args.outdir or Path(tmp)
        run = subprocess.run(
            [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(outdir), str(ROOT)],
            capture_output=True,
            text=True,
        )
        log = run.stdout + run.stderr
        if run.returncode != 0:
            print(log[-4000:], file=sys.stderr)
            print(f"packaging: the build failed (exit {run.returncode})", file=sys.stderr)
            return 1
        found = project_warnings(log)
        if found:
            print("packaging: the build warns about the project's metadata:", file=sys.stderr)
            for line in found:
                print(f"  {line}", file=sys.stderr)
            return 1
        built = sorted(p.name for p in outdir.iterdir())
        print(
            f"packaging: sdist and wheel built with build isolation, no metadata warnings: {', '.join(built)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
