"""scripts/image_slim.py on a small virtual environment of its own: what it keeps still imports."""

from __future__ import annotations

import importlib.util
import subprocess
import venv
from pathlib import Path

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("image_slim", ROOT / "scripts" / "image_slim.py")
assert _spec and _spec.loader
image_slim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(image_slim)


def _package(site: Path, name: str, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = site / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_sources_go_dependencies_still_import_from_pyc_and_from_the_zip(tmp_path: Path) -> None:
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    site = image_slim.site_packages(env)
    _package(site, "dep", {"__init__.py": "from .core import answer\n", "core.py": "answer = 42\n"})
    _package(site, "dep", {"data.txt": "kept\n", "core.pyi": "answer: int\n"})
    _package(site, "kubernetes_asyncio", {"__init__.py": "", "client/__init__.py": "ApiClient = object\n"})
    _package(site, "etlrouter", {"__init__.py": "", "cli.py": "def main() -> None: ...\n"})
    _package(site, "botocore", {"__init__.py": "", "data/s3/model.json": "{}", "data/ec2/model.json": "{}"})
    (site / "CHANGELOG.md").write_text("a wheel's stray file\n")
    (site / "dep" / "__pycache__").mkdir()

    image_slim.slim_venv(env)

    assert sorted(p.name for p in (site / "dep").iterdir()) == ["__init__.pyc", "core.pyc", "data.txt"]
    assert (site / "etlrouter" / "cli.py").exists()  # the project's own sources stay
    assert not (site / "kubernetes_asyncio").exists() and (site / "kubernetes_asyncio.zip").exists()
    assert [p.name for p in (site / "botocore" / "data").iterdir()] == ["s3"]
    assert not (site / "CHANGELOG.md").exists()
    probe = (
        "import dep, kubernetes_asyncio.client as c, etlrouter.cli\n"
        "print(dep.answer, c.ApiClient.__name__, c.__file__.split('site-packages/')[1])\n"
    )
    done = subprocess.run(
        [str(env / "bin" / "python"), "-c", probe], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "42",
        "object",
        "kubernetes_asyncio.zip/kubernetes_asyncio/client/__init__.pyc",
    ]


def test_unknown_arguments_are_refused_with_usage() -> None:
    assert image_slim.main(["nonsense"]) == 2
    assert image_slim.main(["venv"]) == 2
