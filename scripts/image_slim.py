"""Slims the image's file system in the Dockerfile's build stages (docs/image.md, "What is in it").

    python image_slim.py venv VENV     # the virtual environment, after its dependencies are installed
    python image_slim.py base          # the base's packaging tools, in the runtime stage

`venv` keeps what the roles run and drops what they never read:
- botocore's API models of every AWS service but the ones the S3 sink's client can call (S3, and STS/SSO
  for the credential chain: IRSA's AssumeRoleWithWebIdentity, SSO profiles) — 27 MB of 438 services;
- type stubs (`*.pyi`) and loose files wheels drop into site-packages (a changelog);
- the sources of third-party packages: each module is byte-compiled to a sourceless `.pyc` beside where its
  `.py` was (the layout Python imports without a source), so tracebacks through a dependency show file and
  line but not the line's text; the project's own sources stay (byte-compiled later, in `__pycache__`);
- kubernetes_asyncio, the generated client of the whole Kubernetes API that only the operator imports (for
  its ApiClient and config loaders): its sourceless modules go into one deflated zip on sys.path
  (zipimport), 24 MB of `.pyc` in about 4 MB, paid for by the operator's import time (docs/image.md).

`base` removes pip, setuptools, wheel and the wheels ensurepip bundles from the base's interpreter: nothing
installs packages at run time, and a package installer is the first tool an intruder reaches for.
"""

from __future__ import annotations

import py_compile
import shutil
import sys
import sysconfig
import zipfile
from pathlib import Path

BOTOCORE_SERVICES = {"s3", "sts", "sso", "sso-oidc"}
ZIPPED = ("kubernetes_asyncio",)
OWN = "etlrouter"
PACKAGING_TOOLS = ("pip", "setuptools", "wheel", "pkg_resources", "_distutils_hack")
LOOSE_KEPT = {".py", ".pth", ".so"}


def site_packages(venv: Path) -> Path:
    (found,) = (venv / "lib").glob("python3*/site-packages")
    return found


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def prune_botocore(site: Path) -> None:
    data = site / "botocore" / "data"
    for entry in data.iterdir():
        if entry.is_dir() and entry.name not in BOTOCORE_SERVICES:
            shutil.rmtree(entry)


def drop_unread_files(site: Path) -> None:
    for stub in site.rglob("*.pyi"):
        stub.unlink()
    for entry in site.iterdir():
        if entry.is_file() and entry.suffix not in LOOSE_KEPT:
            entry.unlink()


def compile_sourceless(site: Path) -> None:
    """Every third-party `.py` becomes `.pyc` beside it (PEP 3147's legacy layout), the source removed."""
    for top in site.iterdir():
        if top.name == OWN or top.name.endswith((".dist-info", ".egg-info")):
            continue
        if top.name == "__pycache__":
            shutil.rmtree(top)
            continue
        if top.is_dir():
            for cache in list(top.rglob("__pycache__")):
                shutil.rmtree(cache)
        sources = sorted(top.rglob("*.py")) if top.is_dir() else [top] if top.suffix == ".py" else []
        for source in sources:
            py_compile.compile(
                str(source),
                cfile=str(source.with_suffix(".pyc")),
                doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
            source.unlink()


def zip_package(site: Path, name: str) -> None:
    """`name`/ into `name`.zip on sys.path (a .pth line): zipimport loads its sourceless modules from it."""
    package = site / name
    archive = site / f"{name}.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for path in sorted(package.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(site).as_posix())
    shutil.rmtree(package)
    (site / f"{name}-zip.pth").write_text(f"{archive.name}\n")


def slim_venv(venv: Path) -> None:
    site = site_packages(venv)
    before = size(site)
    prune_botocore(site)
    drop_unread_files(site)
    compile_sourceless(site)
    for name in ZIPPED:
        zip_package(site, name)
    print(f"image_slim: {site}: {before / 1e6:.1f} MB -> {size(site) / 1e6:.1f} MB")


def remove(path: Path) -> int:
    """Deletes a file, link or tree if it is there; the bytes it held."""
    if path.is_symlink() or path.is_file():
        held = path.lstat().st_size
        path.unlink()
        return held
    if path.is_dir():
        held = size(path)
        shutil.rmtree(path)
        return held
    return 0


def slim_base() -> None:
    paths = sysconfig.get_paths()
    sites = {Path(paths["purelib"])}
    sites |= {Path(p) for p in sys.path if p.endswith(("dist-packages", "site-packages"))}
    # ensurepip's bundled wheels, and Debian's copy of them
    doomed = [Path(paths["stdlib"]) / "ensurepip" / "_bundled", Path("/usr/share/python-wheels")]
    for site in (s for s in sites if s.is_dir()):
        for entry in site.iterdir():
            dist_info = entry.name.endswith((".dist-info", ".egg-info"))
            stem = entry.name.split("-")[0] if dist_info else entry.name
            if stem in PACKAGING_TOOLS or entry.name == "distutils-precedence.pth":
                doomed.append(entry)
    tools = ("pip", "pip3", f"pip3.{sys.version_info.minor}", "wheel")
    doomed += [Path(bindir) / tool for bindir in ("/usr/local/bin", "/usr/bin") for tool in tools]
    removed = sum(remove(path) for path in doomed)
    print(f"image_slim: packaging tools removed from the base: {removed / 1e6:.1f} MB")


def main(argv: list[str]) -> int:
    if argv[:1] == ["venv"] and len(argv) == 2:
        slim_venv(Path(argv[1]))
    elif argv == ["base"]:
        slim_base()
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
