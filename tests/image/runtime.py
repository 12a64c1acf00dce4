"""Running processes from the container image without a container runtime (shared by tests/image and the
test pod runner, tests/k8s/podrunner.py).

`buildah from` + `buildah mount` give the image's root file system; `buildah run` has no `--read-only`
(buildah 1.28), so each process gets its own mount namespace (`unshare --mount`) where that root is
bind-mounted (read-only unless asked otherwise), the process's volumes are bind-mounted at their paths,
/proc and /dev are mounted, and `chroot --userspec` starts the command with exactly the environment given
(`env -i`). The image's Env, User, WorkingDir, Entrypoint and Cmd come from `buildah inspect`. Needs root.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import ROOT, missing_dependency

STORAGE = ["--storage-driver", os.environ.get("BUILDAH_STORAGE_DRIVER", "overlay")]
DATA = "/var/lib/etlrouter"


def buildah(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(["buildah", *STORAGE, *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"buildah {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Image:
    container: str
    rootfs: Path
    entrypoint: list[str]
    env: list[str]
    user: str
    workdir: str
    cmd: list[str] = field(default_factory=list)
    uid: int = field(init=False)

    def __post_init__(self) -> None:
        self.uid = int(self.user.split(":")[0])


def require_image_tools() -> None:
    """Skip (fail under CI) without buildah or root."""
    if shutil.which("buildah") is None:
        missing_dependency("buildah not installed (scripts/system-deps.sh installs it as root)")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        missing_dependency("running processes from the image needs root (mount namespaces, chroot)")


def image_of_this_tree() -> str:
    """Build (or find up to date) the image of this tree's inputs; its `etlrouter:build-HASH` tag
    (etlrouter:test may have been moved by another tree's build since). ETLROUTER_TEST_IMAGE overrides."""
    if os.environ.get("ETLROUTER_TEST_IMAGE"):
        return os.environ["ETLROUTER_TEST_IMAGE"]
    build = subprocess.run(
        ["bash", str(ROOT / "scripts" / "image-build.sh")], capture_output=True, text=True, timeout=1800
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    inputs = re.search(r"\(inputs ([0-9a-f]+)\)", build.stdout)
    assert inputs, build.stdout
    return f"etlrouter:build-{inputs[1]}"


@contextlib.contextmanager
def open_image(ref: str) -> Iterator[Image]:
    """A working container of `ref`, mounted; removed afterwards."""
    container = buildah("from", "--pull-never", ref).strip()
    try:
        rootfs = Path(buildah("mount", container).strip())
        config = json.loads(buildah("inspect", "--type", "container", container))["OCIv1"]["config"]
        yield Image(
            container,
            rootfs,
            list(config.get("Entrypoint") or []),
            list(config.get("Env") or []),
            str(config.get("User") or "0:0"),
            str(config.get("WorkingDir") or "/"),
            list(config.get("Cmd") or []),
        )
    finally:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            buildah("umount", container)
            buildah("rm", container)


@dataclass(frozen=True)
class Mount:
    source: Path  # a host directory or file
    target: str  # the path inside the image's root
    read_only: bool = False


# Inside a fresh mount namespace: the image's root, read-only — or, given a layer directory, under a
# writable overlay of the process's own (a container's writable layer) — each volume at its path (parents
# before children; a missing mount point is created, in the working container or the parent volume, as a
# runtime does), /proc, /dev; then chroot as the user with exactly the environment.
_ENTER = r"""
set -eu
root=$1 rootfs=$2 user=$3 groups=$4 workdir=$5 layer=$6 name=$7; shift 7
if [ -n "$layer" ]; then
  mkdir -p "$layer/upper" "$layer/work"
  mount -t overlay overlay -o "lowerdir=$rootfs,upperdir=$layer/upper,workdir=$layer/work" "$root"
else
  mount --bind "$rootfs" "$root"
fi
ro=""
while [ "$1" != "--" ]; do
  src=$1 dst=$2 mode=$3; shift 3
  if [ -d "$src" ]; then
    mkdir -p "$root$dst"
  elif [ ! -e "$root$dst" ]; then
    mkdir -p "$(dirname "$root$dst")"; : > "$root$dst"
  fi
  mount --bind "$src" "$root$dst"
  if [ "$mode" = ro ]; then ro="$ro $dst"; fi
done
shift
if [ -z "$layer" ]; then mount -o remount,bind,ro "$root"; fi
for dst in $ro; do mount -o remount,bind,ro "$root$dst"; done
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
if [ -n "$name" ]; then hostname "$name"; fi
exec chroot --userspec="$user" --groups="$groups" "$root" /usr/bin/env -i -C "$workdir" "$@"
"""


def in_root(rootfs: Path, target: str) -> str:
    """`target` with the image's symlinks resolved inside its root (/var/run -> /run in Debian), as a
    runtime does before mounting: never a path out of the root."""
    parts, out, hops = [p for p in target.split("/") if p], [], 0
    while parts:
        part = parts.pop(0)
        if part in (".", ".."):
            out = out[:-1] if part == ".." else out
            continue
        candidate = rootfs.joinpath(*out, part)
        if candidate.is_symlink():
            hops += 1
            assert hops < 40, f"too many symlinks resolving {target} in the image"
            link = os.readlink(candidate)
            out = [] if link.startswith("/") else out
            parts = [p for p in link.split("/") if p] + parts
        else:
            out.append(part)
    return "/" + "/".join(out)


def enter_command(
    image: Image,
    mountpoint: Path,
    command: Sequence[str],
    env: Sequence[str],
    mounts: Sequence[Mount] = (),
    *,
    user: str | None = None,
    groups: Sequence[int] = (),
    workdir: str | None = None,
    layer: Path | None = None,
    hostname: str = "",
    netns: str | None = None,
) -> list[str]:
    """The argv that runs `command` (the full argv, ENTRYPOINT included) from the image with exactly `env`
    ("NAME=value"). The image's root is read-only unless `layer` (a host directory) holds a writable
    layer over it; `netns`: a /run/netns name to join (else host networking); `hostname`: its own UTS
    namespace with that host name."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    spec: list[str] = []
    for m in sorted(mounts, key=lambda m: m.target.rstrip("/").count("/")):
        spec += [str(m.source), in_root(image.rootfs, m.target), "ro" if m.read_only else "rw"]
    unshare = ["unshare", "--mount", *(["--uts"] if hostname else []), "--propagation", "private", "--"]
    join = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    return [
        *join,
        *unshare,
        "sh",
        "-c",
        _ENTER,
        "enter",
        str(mountpoint),
        str(image.rootfs),
        user or image.user,
        ",".join(str(g) for g in groups),
        workdir or image.workdir,
        str(layer or ""),
        hostname,
        *spec,
        "--",
        *env,
        *command,
    ]


class ImageProcesses:
    """Processes started from the image, each with its own host data directory on /var/lib/etlrouter
    (host networking); all stopped at the end."""

    def __init__(self, image: Image, workdir: Path) -> None:
        self.image = image
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def data(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, self.image.uid, self.image.uid)
        return path

    def start(
        self,
        name: str,
        args: list[str],
        env: dict[str, str] | None = None,
        *,
        raw: bool = False,
        mounts: Sequence[Mount] = (),
    ) -> None:
        """`args` after the image's ENTRYPOINT (or, with `raw`, instead of it); `mounts` besides the data
        directory."""
        command = args if raw else [*self.image.entrypoint, *args]
        envs = [*self.image.env, *(f"{k}={v}" for k, v in (env or {}).items())]
        log = (self.workdir / f"{name}.log").open("ab")
        argv = enter_command(
            self.image,
            self.workdir / f".root-{name}",
            command,
            envs,
            [Mount(self.data(name), DATA), *mounts],
        )
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def run(self, name: str, args: list[str], *, raw: bool = False, timeout: float = 60) -> tuple[int, str]:
        self.start(name, args, raw=raw)
        proc = self.procs.pop(name)
        code = proc.wait(timeout=timeout)
        return code, self.log(name)

    def stop(self, name: str, timeout: float) -> tuple[int, float]:
        proc = self.procs.pop(name)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"{name} did not stop within {timeout} s of SIGTERM:\n{self.log(name)[-2000:]}"
            ) from None
        return code, time.monotonic() - started

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.kill()
        for proc in self.procs.values():
            proc.wait()
        self.procs.clear()

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")
