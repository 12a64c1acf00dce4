"""Every role from the container image (issue #17): a 3-router cluster, a generator source, a filter transform
and a jsonl-file sink connector with their sidecars, `etlrouter ctl`, all run from `etlrouter:test` with host
networking on loopback; records flow end to end; SIGTERM drains each process cleanly; the processes run as
uid 10001 on a read-only root file system with only /var/lib/etlrouter writable.

How a process runs from the image (tests/image/runtime.py, shared with the test pod runner): `buildah from`
+ `buildah mount` give the image's root file system; each long-running process gets its own mount namespace
where that root is bind-mounted read-only, its own host directory is bind-mounted on /var/lib/etlrouter, and
`chroot --userspec` starts the image's ENTRYPOINT with the image's Env, User and WorkingDir (host
networking). `etlrouter ctl` goes through `buildah run --isolation chroot --network host` itself. The image is
built (or found up to date by its inputs' hash, tagged etlrouter:build-INPUTS) by scripts/image-build.sh —
`make image`, which `make test` runs first.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.e2e.processes import jsonl_offsets, ready, wait_until
from tests.image.runtime import (
    DATA,
    STORAGE,
    Image,
    ImageProcesses,
    image_of_this_tree,
    open_image,
    require_image_tools,
)

TOTAL = 3000
SIDECAR_ENV = {
    "ETLROUTER_SIDECAR__DATA_DIR": f"{DATA}/dlq",
    "ETLROUTER_SIDECAR__HEARTBEAT_INTERVAL_MS": "500",
    "ETLROUTER_SIDECAR__SCAN_INTERVAL_MS": "500",
    "ETLROUTER_SIDECAR__DRAIN_TIMEOUT_MS": "5000",
}
PIPELINE = """
pipeline image-e2e {
  source orders (batch_size = 200)
  | transform clean (config.expr = "true")
  | sink out (flush = true)
}
"""


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    require_image_tools()
    with open_image(image_of_this_tree()) as img:
        yield img


def ctl(image: Image, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`etlrouter ctl` through `buildah run` (host network; the image's user and entrypoint)."""
    return subprocess.run(
        [
            "buildah",
            *STORAGE,
            "run",
            "--isolation",
            "chroot",
            "--network",
            "host",
            "-v",
            f"{workdir}:/work:ro",
            image.container,
            "--",
            *image.entrypoint,
            "ctl",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def proc_uids(pid: int) -> set[int]:
    """The real/effective/saved/fs uids of `pid` and of its descendants (the entrypoint's process)."""
    uids: set[int] = set()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            uids.update(int(u) for u in line.split()[1:])
    return uids


def test_the_image_runs_as_uid_10001_on_a_read_only_root(image: Image, tmp_path: Path) -> None:
    procs = ImageProcesses(image, tmp_path)
    assert image.user == "10001:10001"
    probe = (
        "import os, pathlib\n"
        "print('uid', os.getuid(), os.getgid(), sorted(os.getgroups()))\n"
        "print('home', os.environ['HOME'], os.access(os.environ['HOME'], os.W_OK))\n"
        "for p in ['/opt/etlrouter/x', '/etc/x', '/tmp/x', '/var/tmp/x', '/x']:\n"
        "    try:\n"
        "        pathlib.Path(p).write_text('x')\n"
        "        print('wrote', p)\n"
        "    except OSError as e:\n"
        "        print('refused', p, e.strerror)\n"
        "pathlib.Path('/var/lib/etlrouter/ok').write_text('ok')\n"
        "print('cwd', os.getcwd())\n"
    )
    code, out = procs.run("probe", ["python", "-c", probe], raw=True)
    assert code == 0, out
    assert "uid 10001 10001 []" in out, out
    assert "home /var/lib/etlrouter True" in out, out
    assert "wrote" not in out, out
    assert out.count("Read-only file system") == 5, out
    assert "cwd /var/lib/etlrouter" in out, out
    assert (tmp_path / "probe" / "ok").read_text() == "ok"
    code, out = procs.run("version", ["--version"])
    assert code == 0 and "0.1.0" in out, out


def test_every_role_from_the_image_records_flow_and_sigterm_drains(image: Image, tmp_path: Path) -> None:
    procs = ImageProcesses(image, tmp_path)
    routers = ["router-0", "router-1", "router-2"]
    grpc = {r: free_port() for r in routers}
    http = {r: free_port() for r in routers}
    peers = [arg for r in routers for arg in ("--peer", f"{r}=127.0.0.1:{grpc[r]}")]
    addresses = [f"127.0.0.1:{grpc[r]}" for r in routers]
    fast = {
        "ETLROUTER_ROUTER__RAFT__TICK_MS": "50",
        "ETLROUTER_ROUTER__SIDECAR_HEARTBEAT_TIMEOUT_MS": "3000",
        "ETLROUTER_ROUTER__LEADER_GRACE_MS": "3000",
    }
    try:
        for r in routers:
            ports = ["--grpc-port", str(grpc[r]), "--http-port", str(http[r])]
            procs.start(r, ["router", "--node-id", r, *ports, "--data-dir", f"{DATA}/raft", *peers], fast)
        wait_until(lambda: all(ready(p) for p in http.values()), 60, "the routers elected a leader")
        services = {"orders": free_port(), "clean": free_port(), "out": free_port()}
        procs.start(
            "orders",
            [
                "connector",
                "generator",
                "--name",
                "orders",
                "--port",
                str(services["orders"]),
                "--limit",
                str(TOTAL),
                "--seed",
                "3",
                "--state-file",
                f"{DATA}/generator.state",
            ],
        )
        procs.start("clean", ["connector", "filter", "--name", "clean", "--port", str(services["clean"])])
        procs.start(
            "out",
            [
                "connector",
                "jsonl-file-sink",
                "--name",
                "out",
                "--port",
                str(services["out"]),
                "--path",
                f"{DATA}/out.jsonl",
            ],
        )
        sidecar_http = {}
        for service, port in services.items():
            name = f"sc-{service}"
            sidecar_http[name] = free_port()
            routers_args = [arg for a in addresses for arg in ("--router", a)]
            procs.start(
                name,
                [
                    "sidecar",
                    "--id",
                    name,
                    *routers_args,
                    "--scan-ports",
                    str(port),
                    "--grpc-port",
                    str(free_port()),
                    "--http-port",
                    str(sidecar_http[name]),
                ],
                SIDECAR_ENV,
            )
        wait_until(lambda: all(ready(p) for p in sidecar_http.values()), 60, "the sidecars registered")

        # Each router, sidecar and connector runs as the image's user, not root.
        for name, proc in procs.procs.items():
            assert proc_uids(proc.pid) == {10001}, name

        ctl_dir = procs.data("ctl")
        (ctl_dir / "pipelines.etl").write_text(PIPELINE)
        applied = ctl(image, ctl_dir, "--router", addresses[0], "apply", "-f", "/work/pipelines.etl")
        assert applied.returncode == 0, applied.stdout + applied.stderr
        sink = tmp_path / "out" / "out.jsonl"
        wait_until(lambda: set(jsonl_offsets(sink)) == set(range(TOTAL)), 90, f"{TOTAL} records in the sink")
        state = tmp_path / "orders" / "generator.state"
        wait_until(
            lambda: state.exists() and json.loads(state.read_text()).get("0") == TOTAL - 1,
            30,
            "the source acknowledged its last offset",
        )
        status = ctl(image, ctl_dir, "--router", addresses[1], "-o", "json", "cluster", "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "router-0" in status.stdout and "router-2" in status.stdout, status.stdout
        listed = ctl(image, ctl_dir, "--router", addresses[2], "list")
        assert listed.returncode == 0 and "image-e2e" in listed.stdout, listed.stdout + listed.stderr
        sidecars = ctl(image, ctl_dir, "--router", addresses[0], "sidecars")
        assert sidecars.returncode == 0 and "sc-out" in sidecars.stdout, sidecars.stdout + sidecars.stderr

        # SIGTERM: sidecars drain (drain_timeout 5 s), then connectors, then routers; each exits 0 in time.
        # The sidecars' grace is their drain timeout (5 s), plus a little for the interpreter to exit.
        for name in ["sc-orders", "sc-clean", "sc-out", "orders", "clean", "out", *routers]:
            code, took = procs.stop(name, timeout=15)
            assert code == 0, f"{name} exited {code} after SIGTERM:\n{procs.log(name)[-2000:]}"
            grace = int(SIDECAR_ENV["ETLROUTER_SIDECAR__DRAIN_TIMEOUT_MS"]) / 1000 + 3
            assert took < grace, f"{name} took {took:.1f} s to stop after SIGTERM (grace {grace} s)"
        for name in ["sc-orders", "sc-clean", "sc-out", *routers]:
            assert "Traceback" not in procs.log(name), procs.log(name)[-3000:]
    finally:
        procs.stop_all()


# Every module of the package, imported on the read-only root as the image's user: the slimmed image
# (scripts/image_slim.py) still holds all that the roles import — sourceless dependencies, the zipped
# Kubernetes client, the AWS models the S3 sink's client and credential chain load.
_CONTENTS_PROBE = """
import asyncio, importlib, importlib.util, pkgutil, shutil, sys
import etlrouter
failed = []
for m in pkgutil.walk_packages(etlrouter.__path__, "etlrouter."):
    if not m.name.endswith("__main__"):
        try:
            importlib.import_module(m.name)
        except Exception as e:
            failed.append(f"{m.name}: {e!r}")
print("import failures:", failed)
print("kubernetes client from", sys.modules["kubernetes_asyncio"].__file__)
print("pip:", shutil.which("pip"), importlib.util.find_spec("pip"), importlib.util.find_spec("setuptools"))
from aiobotocore.session import get_session
async def clients():
    for service in ("s3", "sts", "sso"):
        async with get_session().create_client(
            service, region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
            aws_access_key_id="k", aws_secret_access_key="s",
        ) as c:
            print("client", service, type(c).__name__)
asyncio.run(clients())
"""


def test_the_slimmed_image_imports_every_module_and_has_no_package_installer(
    image: Image, tmp_path: Path
) -> None:
    code, out = ImageProcesses(image, tmp_path).run("contents", ["python", "-c", _CONTENTS_PROBE], raw=True)
    assert code == 0, out
    assert "import failures: []" in out, out
    assert "kubernetes_asyncio.zip/kubernetes_asyncio/__init__.pyc" in out, out
    assert "pip: None None None" in out, out
    for service, cls in (("s3", "S3"), ("sts", "STS"), ("sso", "SSO")):
        assert f"client {service} {cls}" in out, out
    # The dependencies' sources are gone, the project's are kept for its tracebacks.
    site = next((image.rootfs / "opt" / "etlrouter" / "lib").glob("python3*/site-packages"))
    assert not list((site / "aiohttp").glob("*.py")) and list((site / "aiohttp").glob("*.pyc"))
    assert (site / "etlrouter" / "cli.py").exists()
