"""Packaging: the build's metadata warnings are caught, and the locks agree with pyproject.toml."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from types import ModuleType

import pytest

from tests.conftest import ROOT

# What setuptools 80 printed for `license = { text = "Apache-2.0" }` (trimmed), with pip's own noise.
DEPRECATED_LICENSE_LOG = """\
WARNING: Location 'file:///opt/pypi-more/simple/pip/' is ignored: it is neither a file nor a directory.
  /tmp/pip-build-env/overlay/lib/python3.11/site-packages/setuptools/config/_apply_pyprojecttoml.py:82: \
SetuptoolsDeprecationWarning: `project.license` as a TOML table is deprecated
  !!
          Please use a simple string containing a SPDX expression for `project.license`.
          By 2027-Feb-18, you need to update your project and remove deprecated calls
          or your builds will no longer be supported.
  !!
warning: build_py: byte-compiling is disabled, skipping.
"""
CLEAN_LOG = """\
WARNING: Location 'file:///opt/pypi/simple/grpclib/' is ignored: it is neither a file nor a directory.
running bdist_wheel
warning: install_lib: byte-compiling is disabled, skipping.
Successfully built etlrouter-0.1.0.tar.gz and etlrouter-0.1.0-py3-none-any.whl
"""


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_metadata_deprecation_is_reported_and_pip_noise_is_not() -> None:
    found = load("check_packaging").project_warnings(DEPRECATED_LICENSE_LOG)
    assert any("project.license" in line for line in found)
    assert any("2027-Feb-18" in line for line in found)
    assert not any("is ignored" in line or "byte-compiling" in line for line in found)


def test_a_clean_build_log_has_no_project_warnings() -> None:
    assert load("check_packaging").project_warnings(CLEAN_LOG) == []


def test_the_license_is_an_spdx_expression_and_the_backend_is_pinned() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert all("==" in r for r in pyproject["build-system"]["requires"])


def test_the_committed_locks_agree_with_pyproject() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/check_lock.py"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_a_narrowed_range_that_excludes_the_pin_is_a_disagreement(pyproject: dict[str, object]) -> None:
    check = load("check_lock")
    lock = (ROOT / "requirements" / "runtime.lock").read_text()
    project = pyproject["project"]
    assert isinstance(project, dict)
    project["dependencies"] = [
        "grpclib>=99" if d.startswith("grpclib") else d for d in project["dependencies"]
    ]
    problems = check.disagreements(pyproject, lock, check.LOCKS["requirements/runtime.lock"])
    assert len(problems) == 1 and "grpclib" in problems[0] and "outside" in problems[0]


def test_a_new_or_removed_dependency_is_a_disagreement(pyproject: dict[str, object]) -> None:
    check = load("check_lock")
    lock = (ROOT / "requirements" / "runtime.lock").read_text()
    project = pyproject["project"]
    assert isinstance(project, dict)
    project["dependencies"] = [d for d in project["dependencies"] if not d.startswith("click")]
    project["dependencies"].append("left-pad>=1")
    problems = check.disagreements(pyproject, lock, check.LOCKS["requirements/runtime.lock"])
    assert any("left-pad" in p and "not pinned" in p for p in problems)
    assert any(p.startswith("click ") and "no longer declares" in p for p in problems)
    assert len(problems) == 2
