"""A real kube-apiserver (+ etcd + kube-controller-manager) on loopback for the operator's tests.

The binaries are built once by `scripts/k8s-apiserver.sh` (Debian's upstream v1.20.2 source) and cached;
see docs/operator.md. There is no scheduler and no kubelet: pods stay
Pending. The controller manager runs the garbage collector, namespace and StatefulSet controllers, so
ownerReference GC and namespace deletion behave as on a real cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import free_port

VERSION = "v1.20.2"
SCRIPT = "scripts/k8s-apiserver.sh"
CONTROLLERS = "garbagecollector,namespace,statefulset,serviceaccount-token,serviceaccount"
# With a proxy in the environment the apiserver would send webhook calls through it.
_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


def bin_dir() -> Path:
    cache = Path(os.environ.get("ETLROUTER_K8S_CACHE") or Path.home() / ".cache/etlrouter/k8s")
    return cache / VERSION / "bin"


def missing_binaries() -> list[str]:
    """What is missing to run the test cluster ([] = everything is there)."""
    missing = [
        str(bin_dir() / name)
        for name in ("kube-apiserver", "kube-controller-manager")
        if not os.access(bin_dir() / name, os.X_OK)
    ]
    missing += [tool for tool in ("etcd", "openssl") if shutil.which(tool) is None]
    return missing


class KubeHttp:
    """A tiny synchronous client of the apiserver for fixtures and assertions (no event loop needed)."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self._ssl = ssl.create_default_context()
        self._ssl.check_hostname = False
        self._ssl.verify_mode = ssl.CERT_NONE

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        accept: str = "application/json",
        timeout: float = 10.0,
    ) -> tuple[int, Any]:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", accept)
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str) -> Any:
        """GET that must succeed; None on 404."""
        status, body = self.request("GET", path)
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body}")
        return body


class KubeApiServer:
    """etcd (data on /dev/shm) + kube-apiserver + kube-controller-manager as child processes.

    `controllers`: what the controller manager runs; `hosts`: an /etc/hosts the apiserver resolves names
    with (its own mount namespace; needs root) — the pod runner's, so it reaches a webhook by DNS name;
    `service_accounts`: keep the ServiceAccount admission plugin (pods get `serviceAccountName: default`
    and its token Secret mounted, as on a real cluster; off by default: the tests' pods never run)."""

    def __init__(
        self,
        workdir: Path,
        *,
        controllers: str = CONTROLLERS,
        hosts: Path | None = None,
        service_accounts: bool = False,
    ) -> None:
        self.workdir = workdir
        self.controllers = controllers
        self.hosts = hosts
        self.service_accounts = service_accounts
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = workdir / "kubeconfig"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.startup_s = 0.0
        shm = Path("/dev/shm")
        self._etcd_dir = Path(tempfile.mkdtemp(prefix="etlrouter-etcd-", dir=shm if shm.is_dir() else None))
        self.http = KubeHttp(self.url, self.token)

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)

    def start(self, timeout: float = 60.0) -> None:
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        certs = self.workdir / "certs"
        certs.mkdir(exist_ok=True)
        sa_key, sa_pub = certs / "sa.key", certs / "sa.pub"
        subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True)
        subprocess.run(
            ["openssl", "rsa", "-in", str(sa_key), "-pubout", "-out", str(sa_pub)],
            check=True,
            capture_output=True,
        )
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f'{self.token},admin,admin-uid,"system:masters"\n')
        etcd_port, etcd_peer = free_port(), free_port()
        self._spawn(
            "etcd",
            [
                "etcd",
                "--data-dir",
                str(self._etcd_dir),
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{etcd_peer}",
                "--log-level",
                "warn",
            ],
        )
        wrap: list[str] = []
        env = None
        if self.hosts is not None:
            hosts = 'mount --bind "$0" /etc/hosts && exec "$@"'
            wrap = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                hosts,
                str(self.hosts),
            ]
            env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
        self._spawn(
            "kube-apiserver",
            [
                *wrap,
                str(bin_dir() / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                "--insecure-port=0",
                f"--cert-dir={certs}",
                f"--token-auth-file={tokens}",
                "--authorization-mode=RBAC",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_key}",
                "--allow-privileged=true",
                *([] if self.service_accounts else ["--disable-admission-plugins=ServiceAccount"]),
                "--profiling=false",
                "--endpoint-reconciler-type=none",
                "--v=0",
            ],
            env,
        )
        self.kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {"name": "test", "cluster": {"server": self.url, "insecure-skip-tls-verify": True}}
                    ],
                    "users": [{"name": "admin", "user": {"token": self.token}}],
                    "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
                    "current-context": "test",
                }
            )
        )
        self._wait_ready(t0 + timeout)
        self._spawn(
            "kube-controller-manager",
            [
                str(bin_dir() / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                f"--controllers={self.controllers}",
                "--leader-elect=false",
                "--port=0",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--service-account-private-key-file={sa_key}",
                f"--root-ca-file={certs / 'apiserver.crt'}",
                "--v=0",
            ],
        )
        self.startup_s = time.monotonic() - t0

    def _wait_ready(self, deadline: float) -> None:
        last: object = None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; log: {self.log_tail(name)}")
            try:
                status, last = self.http.request("GET", "/readyz", timeout=2)
                if status == 200:
                    return
            except OSError as e:
                last = e
            time.sleep(0.1)
        raise TimeoutError(f"kube-apiserver not ready: {last}; log: {self.log_tail('kube-apiserver')}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        # Reverse order: controller manager, apiserver, then etcd.
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        shutil.rmtree(self._etcd_dir, ignore_errors=True)
