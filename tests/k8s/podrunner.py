"""A test-only stand-in kubelet: runs the pods the operator's objects produce, from the built image.

The operator's tests have a real kube-apiserver and controller manager but no kubelet, so the pods of the
StatefulSets and Deployments it writes never start. `PodRunner` plays kubelet (and scheduler) for the
namespaces it serves, on one fake Node:

- **Node and binding**: it creates the Node `podrunner` (Ready) and keeps its heartbeat fresh; a Pending pod
  without `spec.nodeName` is bound to it (`pods/NAME/binding`: there is no scheduler).
- **Network**: each pod gets its own network namespace on a private bridge (`etlrouter.testing.netns`'s
  Topology, subnet 10.214.x.0/24) and a fresh address as `status.podIP`, so every pod has its own ports
  (two routers both bind 0.0.0.0:7400, as in a cluster). The root namespace gets one veth on the bridge
  (`.1`, the Node's address): the operator and the test reach pods as from a node, pods reach the host
  there. There is no DNS server and no kube-proxy: one /etc/hosts file, rewritten in place as pods come
  and go, is bind-mounted into every container (and may be given to other processes): a pod's
  `HOSTNAME.SUBDOMAIN.NS.svc[.cluster.local]`, a Service's `NAME.NS.svc[.cluster.local]` → the address of
  one ready pod it selects (any, for a headless Service that publishes not-ready addresses), plus
  `extra_hosts`. So a Service reaches its pod only on a port equal to its targetPort.
- **Containers**: each runs from the image as tests/image/runtime.py runs processes — its own mount
  namespace, the image's root read-only (`readOnlyRootFilesystem`) or under the container's own writable
  overlay layer (`.layer-CONTAINER/upper` in the pod's directory), the volumes at their mountPaths,
  `chroot` as `runAsUser`/`runAsGroup` (else the image's USER) with `fsGroup` and `supplementalGroups` —
  with exactly the kubelet's argv and environment: `command` replaces the image's ENTRYPOINT, `args` its
  CMD; the image's Env, then the service links (`{SVC}_SERVICE_HOST`… of every ClusterIP Service in the
  namespace unless `enableServiceLinks: false`, and the `kubernetes` Service's), `envFrom`, `env` with
  `valueFrom` (fieldRef incl. status.podIP, secretKeyRef, configMapKeyRef) and `$(VAR)` expansion in env
  values, command and args. The containers of a pod share its network namespace and host name.
- **Volumes**: emptyDir, configMap, secret, projected (serviceAccountToken through the TokenRequest API,
  bound to the pod; configMap; secret) written as files once at start (not refreshed), with `defaultMode` /
  `mode` and the fsGroup as group; persistentVolumeClaim as a host directory kept per claim name (no PV is
  made: a re-created StatefulSet pod gets its data back).
- **Probes**: readiness and liveness, httpGet (HTTP, or HTTPS without verification as the kubelet does) and
  tcpSocket, with initialDelaySeconds, periodSeconds, timeoutSeconds, success/failureThreshold; a failed
  liveness restarts the container. `status` carries phase, the PodScheduled/Initialized/ContainersReady/Ready
  conditions, podIP, hostIP and containerStatuses (state, ready, restartCount, lastState).
- **Restarts and deletion**: an exited container restarts per restartPolicy with the kubelet's back-off
  (10 s doubling, at most 300 s); a pod with a deletionTimestamp gets SIGTERM in each container, SIGKILL
  after its grace period, and is then deleted with gracePeriodSeconds=0, as the kubelet does.

Not supported (the pod reports CreateContainerConfigError naming it): init containers, exec and startup
probes, hostPath/downwardAPI volumes, subPathExpr, resourceFieldRef. Resources are not enforced. Needs root.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etlrouter.testing.netns import Topology, _kill_and_delete, _sh
from tests.image.runtime import Image, Mount, enter_command
from tests.k8s.apiserver import KubeHttp

log = logging.getLogger(__name__)

NODE = "podrunner"
TICK_S = 0.2
HEARTBEAT_S = 10.0
BACKOFF_S, BACKOFF_MAX_S = 10.0, 300.0
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ConfigError(Exception):
    """What the kubelet reports as CreateContainerConfigError: the pod cannot be started as written."""


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expand(value: str, env: Mapping[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion: defined variables are replaced, others stay; `$$` is `$`."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, value)


def service_env(services: list[dict[str, Any]]) -> dict[str, str]:
    """Docker-links-style variables of ClusterIP Services, as the kubelet sets them."""
    env: dict[str, str] = {}
    for svc in services:
        ip = (svc.get("spec") or {}).get("clusterIP")
        if not ip or ip == "None":
            continue
        name = svc["metadata"]["name"].upper().replace("-", "_")
        ports = svc["spec"].get("ports") or []
        if not ports:
            continue
        env[f"{name}_SERVICE_HOST"] = ip
        env[f"{name}_SERVICE_PORT"] = str(ports[0]["port"])
        for p in ports:
            if p.get("name"):
                env[f"{name}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
        first = ports[0]
        env[f"{name}_PORT"] = f"{first.get('protocol', 'TCP').lower()}://{ip}:{first['port']}"
        for p in ports:
            proto = p.get("protocol", "TCP")
            prefix = f"{name}_PORT_{p['port']}_{proto}"
            env[prefix] = f"{proto.lower()}://{ip}:{p['port']}"
            env[f"{prefix}_PROTO"] = proto.lower()
            env[f"{prefix}_PORT"] = str(p["port"])
            env[f"{prefix}_ADDR"] = ip
    return env


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@dataclass
class Probe:
    spec: dict[str, Any]
    started: float
    ok: bool
    due: float = 0.0
    successes: int = 0
    failures: int = 0

    def __post_init__(self) -> None:
        self.due = self.started + float(self.spec.get("initialDelaySeconds", 0))

    def record(self, success: bool) -> None:
        period = float(self.spec.get("periodSeconds", 10))
        self.due = time.monotonic() + period
        if success:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= int(self.spec.get("successThreshold", 1)):
                self.ok = True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= int(self.spec.get("failureThreshold", 3)):
                self.ok = False


@dataclass(frozen=True)
class Terminated:
    """A container stopped because its pod was deleted: its exit code (-9: SIGKILLed at the end of the
    grace period) and the seconds since SIGTERM."""

    namespace: str
    pod: str
    container: str
    exit_code: int
    seconds: float


@dataclass
class Container:
    spec: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None
    started_at: str = ""
    restarts: int = 0
    last_state: dict[str, Any] = field(default_factory=dict)
    waiting: tuple[str, str] | None = None
    restart_at: float = 0.0
    readiness: Probe | None = None
    liveness: Probe | None = None
    exit: dict[str, Any] | None = None  # the terminated state, when it will not run again

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def port(self, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in self.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ConfigError(f"container {self.name}: no port named {port!r}")


class PodWorker:
    """One pod (by uid): its network namespace, volumes and container processes."""

    def __init__(self, runner: PodRunner, pod: dict[str, Any]) -> None:
        self.runner = runner
        self.pod = pod
        meta = pod["metadata"]
        self.namespace, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.dir = runner.workdir / "pods" / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        self.dir.mkdir(parents=True)
        self.node = runner.net.add(self.uid[:12])
        self.ip = self.node.address
        self.started = now()
        self.containers = [Container(c) for c in pod["spec"]["containers"]]
        self.error: str | None = None
        self.mounts: dict[str, list[Mount]] = {}
        self.terminating_until: float | None = None
        self.terminating_since = 0.0
        self.finished = False
        self.conditions: dict[str, tuple[str, str]] = {}  # type -> (status, lastTransitionTime)
        self.reported: Any = None
        try:
            if pod["spec"].get("initContainers"):
                raise ConfigError("init containers are not supported by the pod runner")
            self._volumes()
        except ConfigError as e:
            self.error = str(e)

    # --- setup ----------------------------------------------------------------------------------------

    @property
    def fs_group(self) -> int | None:
        group = (self.pod["spec"].get("securityContext") or {}).get("fsGroup")
        return None if group is None else int(group)

    def _own(self, path: Path, mode: int) -> None:
        path.chmod(mode)
        if self.fs_group is not None:
            os.chown(path, 0, self.fs_group)

    def _files(
        self, target: Path, data: dict[str, bytes], items: list[dict[str, Any]] | None, mode: int
    ) -> None:
        chosen = [(i["key"], i["path"], i.get("mode", mode)) for i in items] if items else None
        for key, path, file_mode in chosen or [(k, k, mode) for k in data]:
            if key not in data:
                raise ConfigError(f"key {key!r} not found")
            out = target / path
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data[key])
            self._own(out, file_mode)

    def _data_of(self, kind: str, name: str, optional: bool = False) -> dict[str, bytes] | None:
        plural = {"configMap": "configmaps", "secret": "secrets"}[kind]
        obj = self.runner.http.get(f"/api/v1/namespaces/{self.namespace}/{plural}/{name}")
        if obj is None:
            if optional:
                return None
            raise ConfigError(f"{kind} {name!r} not found")
        if kind == "secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return out

    def _token(self, source: dict[str, Any]) -> bytes:
        account = self.pod["spec"].get("serviceAccountName") or "default"
        spec: dict[str, Any] = {
            "expirationSeconds": int(source.get("expirationSeconds", 3600)),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid},
        }
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        status, body = self.runner.http.request(
            "POST",
            f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        if status != 201:
            raise ConfigError(f"TokenRequest for serviceaccount {account}: {status} {body}")
        return str(body["status"]["token"]).encode()

    def _volumes(self) -> None:
        paths: dict[str, Path] = {}
        for vol in self.pod["spec"].get("volumes") or []:
            name = vol["name"]
            path = self.dir / "volumes" / name
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                path = self.runner.workdir / "claims" / self.namespace / claim
                if not path.exists():
                    path.mkdir(parents=True)
                    self._own(path, 0o2775 if self.fs_group is not None else 0o755)
                paths[name] = path
                continue
            path.mkdir(parents=True)
            if "emptyDir" in vol:
                path.chmod(0o777)
            elif "configMap" in vol or "secret" in vol:
                kind = "configMap" if "configMap" in vol else "secret"
                src = vol[kind]
                ref = src.get("name") if kind == "configMap" else src.get("secretName")
                data = self._data_of(kind, ref, bool(src.get("optional")))
                self._files(path, data or {}, src.get("items"), int(src.get("defaultMode", 0o644)))
                self._own(path, 0o755)
            elif "projected" in vol:
                mode = int(vol["projected"].get("defaultMode", 0o644))
                for source in vol["projected"].get("sources") or []:
                    if "serviceAccountToken" in source:
                        sat = source["serviceAccountToken"]
                        self._files(
                            path, {"token": self._token(sat)}, [{"key": "token", "path": sat["path"]}], mode
                        )
                    elif "configMap" in source or "secret" in source:
                        kind = "configMap" if "configMap" in source else "secret"
                        src = source[kind]
                        data = self._data_of(kind, src["name"], bool(src.get("optional")))
                        self._files(path, data or {}, src.get("items"), mode)
                    else:
                        raise ConfigError(f"volume {name}: projected source {sorted(source)} not supported")
                self._own(path, 0o755)
            else:
                kinds = sorted(set(vol) - {"name"})
                raise ConfigError(f"volume {name}: {kinds} not supported by the pod runner")
            paths[name] = path
        for c in self.containers:
            mounts = [Mount(self.runner.hosts, "/etc/hosts", read_only=True)]
            for m in c.spec.get("volumeMounts") or []:
                if m["name"] not in paths:
                    raise ConfigError(f"container {c.name}: volumeMount {m['name']!r} names no volume")
                if m.get("subPathExpr"):
                    raise ConfigError(f"container {c.name}: subPathExpr not supported")
                source = paths[m["name"]] / m.get("subPath", "")
                shared = next(
                    (k for k in ("configMap", "secret", "projected") if k in self._volume(m["name"])), None
                )
                # Secret, ConfigMap and projected volumes are always mounted read-only by the kubelet.
                mounts.append(
                    Mount(source, m["mountPath"], read_only=bool(m.get("readOnly")) or shared is not None)
                )
            self.mounts[c.name] = mounts

    def _volume(self, name: str) -> dict[str, Any]:
        return next(v for v in self.pod["spec"].get("volumes") or [] if v["name"] == name)

    def _field(self, path: str) -> str:
        meta = self.pod["metadata"]
        simple = {
            "metadata.name": self.name,
            "metadata.namespace": self.namespace,
            "metadata.uid": self.uid,
            "spec.nodeName": NODE,
            "spec.serviceAccountName": self.pod["spec"].get("serviceAccountName") or "default",
            "status.podIP": self.ip,
            "status.podIPs": self.ip,
            "status.hostIP": self.runner.host_ip,
        }
        if path in simple:
            return str(simple[path])
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if m:
            return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
        raise ConfigError(f"fieldRef {path!r} not supported")

    def environment(self, c: Container) -> dict[str, str]:
        """What the kubelet gives the runtime (service links, envFrom, env); the image's Env goes under it."""
        env: dict[str, str] = {}
        spec = self.pod["spec"]
        services = self.runner.services.get(self.namespace, [])
        if spec.get("enableServiceLinks", True):
            env.update(service_env(services))
        env.update(service_env(self.runner.master_services))
        for source in c.spec.get("envFrom") or []:
            kind = "configMap" if "configMapRef" in source else "secret"
            ref = source.get("configMapRef") or source.get("secretRef") or {}
            data = self._data_of(kind, ref["name"], bool(ref.get("optional"))) or {}
            env.update({source.get("prefix", "") + k: v.decode() for k, v in data.items()})
        for var in c.spec.get("env") or []:
            if "valueFrom" not in var:
                env[var["name"]] = expand(str(var.get("value", "")), env)
                continue
            ref = var["valueFrom"]
            if "fieldRef" in ref:
                env[var["name"]] = self._field(ref["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in ref or "configMapKeyRef" in ref:
                kind = "secret" if "secretKeyRef" in ref else "configMap"
                key_ref = ref.get("secretKeyRef") or ref["configMapKeyRef"]
                found = self._data_of(kind, key_ref["name"], bool(key_ref.get("optional")))
                if found is None or key_ref["key"] not in found:
                    if key_ref.get("optional"):
                        continue
                    raise ConfigError(
                        f"env {var['name']}: key {key_ref['key']!r} of {kind} {key_ref['name']!r}"
                    )
                env[var["name"]] = found[key_ref["key"]].decode()
            else:
                raise ConfigError(f"env {var['name']}: {sorted(ref)} not supported by the pod runner")
        return env

    @property
    def hostname(self) -> str:
        return str(self.pod["spec"].get("hostname") or self.name)

    def command(self, c: Container, mapping: dict[str, str]) -> list[str]:
        image = self.runner.image_of(c.spec["image"])
        command, args = c.spec.get("command"), c.spec.get("args")
        if command:
            argv = [*command, *(args or [])]
        else:
            argv = [*image.entrypoint, *(args if args is not None else image.cmd)]
        return [expand(a, mapping) for a in argv]

    def user(self, c: Container) -> tuple[str, list[int]]:
        pod_sc = self.pod["spec"].get("securityContext") or {}
        sc = c.spec.get("securityContext") or {}
        image = self.runner.image_of(c.spec["image"])
        image_uid, _, image_gid = image.user.partition(":")
        uid = int(sc.get("runAsUser", pod_sc.get("runAsUser", image_uid)))
        gid = int(sc.get("runAsGroup", pod_sc.get("runAsGroup", image_gid or 0)))
        if uid == 0 and sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            raise ConfigError(f"container {c.name}: runAsNonRoot and the image will run as root")
        groups = [
            *([self.fs_group] if self.fs_group is not None else []),
            *pod_sc.get("supplementalGroups", []),
        ]
        return f"{uid}:{gid}", groups

    def start(self, c: Container) -> None:
        try:
            image = self.runner.image_of(c.spec["image"])
        except KeyError:
            c.waiting = ("ErrImagePull", f"the pod runner has no image {c.spec['image']!r}")
            return
        try:
            env = self.environment(c)
            image_env = dict(e.split("=", 1) for e in image.env)
            final = {**image_env, "HOSTNAME": self.hostname, **env}
            user, groups = self.user(c)
            read_only = bool((c.spec.get("securityContext") or {}).get("readOnlyRootFilesystem"))
            argv = enter_command(
                image,
                self.dir / f".root-{c.name}",
                self.command(c, env),
                [f"{k}={v}" for k, v in final.items()],
                self.mounts[c.name],
                user=user,
                groups=groups,
                workdir=c.spec.get("workingDir") or image.workdir,
                layer=None if read_only else self.dir / f".layer-{c.name}",
                hostname=self.hostname,
                netns=self.node.ns,
            )
        except ConfigError as e:
            c.waiting = ("CreateContainerConfigError", str(e))
            return
        out = (self.dir / f"{c.name}.log").open("ab")
        try:
            c.proc = subprocess.Popen(
                argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True
            )
        finally:
            out.close()
        c.started_at, c.waiting = now(), None
        started = time.monotonic()
        if c.spec.get("readinessProbe"):
            c.readiness = Probe(c.spec["readinessProbe"], started, ok=False)
        if c.spec.get("livenessProbe"):
            c.liveness = Probe(c.spec["livenessProbe"], started, ok=True)

    # --- running --------------------------------------------------------------------------------------

    def probe(self, c: Container, spec: dict[str, Any]) -> bool:
        timeout = float(spec.get("timeoutSeconds", 1))
        try:
            if "httpGet" in spec:
                get = spec["httpGet"]
                scheme = str(get.get("scheme", "HTTP")).lower()
                url = f"{scheme}://{get.get('host') or self.ip}:{c.port(get['port'])}{get.get('path', '/')}"
                req = urllib.request.Request(
                    url, headers={h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                )
                context = ssl.create_default_context()
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                opener = _NO_PROXY
                if scheme == "https":
                    opener = urllib.request.build_opener(
                        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
                    )
                with opener.open(req, timeout=timeout) as r:
                    return bool(200 <= r.status < 400)
            if "tcpSocket" in spec:
                with socket.create_connection((self.ip, c.port(spec["tcpSocket"]["port"])), timeout=timeout):
                    return True
        except (OSError, urllib.error.URLError, ConfigError):
            return False
        return False  # exec probes: not supported

    def _exited(self, c: Container, code: int) -> None:
        assert c.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(c.proc.pid, signal.SIGKILL)
        state = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": c.started_at,
            "finishedAt": now(),
        }
        c.proc, c.readiness, c.liveness = None, None, None
        if self.terminating_until is not None:
            took = time.monotonic() - self.terminating_since
            self.runner.terminated.append(Terminated(self.namespace, self.name, c.name, code, took))
        policy = self.pod["spec"].get("restartPolicy", "Always")
        if self.terminating_until is not None or policy == "Never" or (policy == "OnFailure" and code == 0):
            c.exit = state
            return
        c.last_state = {"terminated": state}
        c.restart_at = time.monotonic() + min(BACKOFF_S * 2**c.restarts, BACKOFF_MAX_S)
        c.restarts += 1
        c.waiting = ("CrashLoopBackOff", f"back-off restarting failed container {c.name}")

    def tick(self) -> None:
        if self.error is not None:
            return
        for c in self.containers:
            if c.proc is None:
                if c.exit is None and self.terminating_until is None and time.monotonic() >= c.restart_at:
                    self.start(c)
                continue
            code = c.proc.poll()
            if code is not None:
                self._exited(c, code)
                continue
            if self.terminating_until is not None:
                continue
            for probe in (c.readiness, c.liveness):
                if probe is not None and time.monotonic() >= probe.due:
                    probe.record(self.probe(c, probe.spec))
            if c.liveness is not None and not c.liveness.ok:
                log.info("liveness failed: restarting %s/%s", self.name, c.name)
                self.kill(c, signal.SIGKILL)

    def kill(self, c: Container, sig: signal.Signals) -> None:
        if c.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                if sig == signal.SIGKILL:
                    os.killpg(c.proc.pid, sig)
                else:
                    c.proc.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM to every container; SIGKILL when the grace period ends (`tick_terminating`)."""
        if self.terminating_until is not None:
            return
        meta, spec = self.pod["metadata"], self.pod["spec"]
        grace = meta.get("deletionGracePeriodSeconds", spec.get("terminationGracePeriodSeconds", 30))
        self.terminating_until = time.monotonic() + float(grace)
        self.terminating_since = time.monotonic()
        for c in self.containers:
            self.kill(c, signal.SIGTERM)

    def tick_terminating(self) -> bool:
        """True once every process is gone (SIGKILLed when the grace period is over)."""
        self.tick()  # reaps what exited; nothing restarts while terminating
        if all(c.proc is None for c in self.containers):
            return True
        if time.monotonic() < (self.terminating_until or 0.0):
            return False
        for c in self.containers:
            if c.proc is not None:
                self.kill(c, signal.SIGKILL)
                self._exited(c, c.proc.wait())
        return True

    def destroy(self) -> None:
        for c in self.containers:
            self.kill(c, signal.SIGKILL)
            if c.proc is not None:
                c.proc.wait()
        _kill_and_delete(self.node.ns)
        self.runner.net.nodes.pop(self.uid[:12], None)
        self.finished = True

    # --- status ---------------------------------------------------------------------------------------

    def ready(self) -> bool:
        return (
            self.error is None
            and self.terminating_until is None
            and all(c.proc is not None and (c.readiness is None or c.readiness.ok) for c in self.containers)
        )

    def container_status(self, c: Container) -> dict[str, Any]:
        state: dict[str, Any]
        if self.error is not None:
            state = {"waiting": {"reason": "CreateContainerConfigError", "message": self.error}}
        elif c.proc is not None:
            state = {"running": {"startedAt": c.started_at}}
        elif c.exit is not None:
            state = {"terminated": c.exit}
        else:
            reason, message = c.waiting or ("ContainerCreating", "")
            state = {"waiting": {"reason": reason, "message": message}}
        ready = (
            c.proc is not None and self.terminating_until is None and (c.readiness is None or c.readiness.ok)
        )
        status = {
            "name": c.name,
            "image": c.spec["image"],
            "imageID": "",
            "ready": ready,
            "started": c.proc is not None,
            "restartCount": c.restarts,
            "state": state,
            "lastState": c.last_state,
        }
        if c.proc is not None:
            status["containerID"] = f"podrunner://{c.proc.pid}"
        return status

    def _condition(self, type_: str, ok: bool) -> dict[str, Any]:
        value = "True" if ok else "False"
        previous = self.conditions.get(type_)
        if previous is None or previous[0] != value:
            self.conditions[type_] = (value, now())
        return {
            "type": type_,
            "status": value,
            "lastTransitionTime": self.conditions[type_][1],
            "lastProbeTime": None,
        }

    def status(self) -> dict[str, Any]:
        exits = [c.exit for c in self.containers]
        phase = "Running"
        if self.error is not None or any(
            c.proc is None and c.exit is None and c.restarts == 0 for c in self.containers
        ):
            phase = "Pending"
        if all(e is not None for e in exits):
            phase = "Succeeded" if all(e and e["exitCode"] == 0 for e in exits) else "Failed"
        ready = self.ready()
        return {
            "phase": phase,
            "conditions": [
                self._condition("Initialized", True),
                self._condition("Ready", ready),
                self._condition("ContainersReady", ready),
                self._condition("PodScheduled", True),
            ],
            "hostIP": self.runner.host_ip,
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.started,
            "containerStatuses": [self.container_status(c) for c in self.containers],
        }

    def report(self) -> None:
        status = self.status()
        if status == self.reported:
            return
        code, body = self.runner.http.request(
            "PATCH",
            f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status",
            {"metadata": {"uid": self.uid}, "status": status},
            content_type="application/merge-patch+json",
        )
        if code == 200:
            self.reported = status
        elif code != 404:
            log.warning("status of %s/%s: %s %s", self.namespace, self.name, code, body)


class PodRunner:
    """Runs the pods of `namespaces` (see the module docstring); `images`: the image names it runs, each
    from the given image; `hosts`: the /etc/hosts file it keeps (written in place); `extra_hosts`: names
    it adds to it. Start with `start()`, stop with `stop()`; the loop runs on a thread."""

    def __init__(
        self,
        http: KubeHttp,
        images: Mapping[str, Image],
        workdir: Path,
        namespaces: set[str],
        *,
        hosts: Path,
        extra_hosts: Mapping[str, str] | None = None,
    ) -> None:
        self.http = http
        self.images = dict(images)
        self.workdir = workdir
        self.namespaces = namespaces
        self.extra_hosts = dict(extra_hosts or {})
        self.net = Topology(subnet=f"10.214.{20 + os.getpid() % 200}", family="etlk")
        self.host_ip = f"{self.net.subnet}.1"
        self._host_link = f"etlk{os.getpid()}h"[:15]
        self.hosts = hosts  # may exist already (the apiserver's bind mount holds its inode)
        self.workers: dict[str, PodWorker] = {}
        self.services: dict[str, list[dict[str, Any]]] = {}
        self.master_services: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._heartbeat = 0.0
        self.errors: list[str] = []
        self.terminated: list[Terminated] = []  # every container stopped by a pod deletion

    def image_of(self, name: str) -> Image:
        return self.images[name]

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hosts.write_text("127.0.0.1 localhost\n")
        self.hosts.chmod(0o644)
        self.net.create()
        _sh(
            "ip",
            "link",
            "add",
            self._host_link,
            "type",
            "veth",
            "peer",
            "name",
            "host",
            "netns",
            self.net.switch,
        )
        _sh("ip", "-n", self.net.switch, "link", "set", "host", "master", "br0")
        _sh("ip", "-n", self.net.switch, "link", "set", "host", "up")
        _sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self._host_link)
        _sh("ip", "link", "set", self._host_link, "up")
        master = self.http.get("/api/v1/namespaces/default/services/kubernetes")
        self.master_services = [master] if master else []
        self._register_node()
        self._thread = threading.Thread(target=self._loop, name="podrunner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for worker in self.workers.values():
            worker.destroy()
        self.workers.clear()
        self.net.destroy()  # the host veth goes with its peer in the switch namespace

    def _register_node(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
        }
        code, body = self.http.request("POST", "/api/v1/nodes", node)
        assert code in (201, 409), body
        self._node_status()

    def _node_status(self) -> None:
        stamp = now()
        ready = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "the test pod runner is posting ready status",
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": stamp,
        }
        status = {
            "conditions": [ready],
            "addresses": [
                {"type": "InternalIP", "address": self.host_ip},
                {"type": "Hostname", "address": NODE},
            ],
            "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
        }
        self.http.request(
            "PATCH",
            f"/api/v1/nodes/{NODE}/status",
            {"status": status},
            content_type="application/merge-patch+json",
        )
        self._heartbeat = time.monotonic()

    # --- the loop -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception as e:  # keep running; the test sees errors in `errors`
                log.exception("pod runner sync failed")
                self.errors.append(repr(e))
            self._stop.wait(TICK_S)

    def _sync(self) -> None:
        if time.monotonic() - self._heartbeat > HEARTBEAT_S:
            self._node_status()
        pods: list[dict[str, Any]] = []
        for ns in sorted(self.namespaces):
            self.services[ns] = (self.http.get(f"/api/v1/namespaces/{ns}/services") or {"items": []})["items"]
            pods += (self.http.get(f"/api/v1/namespaces/{ns}/pods") or {"items": []})["items"]
        seen = set()
        for pod in pods:
            meta, spec = pod["metadata"], pod["spec"]
            if not spec.get("nodeName"):
                if not meta.get("deletionTimestamp"):
                    self._bind(pod)
                continue
            if spec["nodeName"] != NODE:
                continue
            uid = meta["uid"]
            seen.add(uid)
            worker = self.workers.get(uid)
            if worker is None:
                if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed") and not meta.get(
                    "deletionTimestamp"
                ):
                    continue
                worker = self.workers[uid] = PodWorker(self, pod)
            worker.pod = pod
            if meta.get("deletionTimestamp"):
                worker.terminate()
        for uid, worker in list(self.workers.items()):
            if uid not in seen:  # deleted (forced) or its namespace gone
                worker.destroy()
                del self.workers[uid]
                continue
            if worker.terminating_until is not None:
                worker.report()
                if worker.tick_terminating():
                    worker.destroy()
                    del self.workers[uid]
                    path = f"/api/v1/namespaces/{worker.namespace}/pods/{worker.name}"
                    body = {
                        "kind": "DeleteOptions",
                        "apiVersion": "v1",
                        "gracePeriodSeconds": 0,
                        "preconditions": {"uid": uid},
                    }
                    self.http.request("DELETE", path, body)
                continue
            worker.tick()
            worker.report()
        self._write_hosts()

    def _bind(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": NODE},
        }
        code, body = self.http.request(
            "POST", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding", binding
        )
        if code not in (201, 409):
            log.warning("binding %s: %s %s", meta["name"], code, body)

    def _write_hosts(self) -> None:
        lines = ["127.0.0.1 localhost"]
        live = [w for w in self.workers.values() if not w.finished]
        for w in sorted(live, key=lambda w: (w.namespace, w.name)):
            spec = w.pod["spec"]
            if spec.get("hostname") and spec.get("subdomain"):
                fqdn = f"{spec['hostname']}.{spec['subdomain']}.{w.namespace}.svc"
                lines.append(f"{w.ip} {fqdn} {fqdn}.cluster.local")
        for ns, services in sorted(self.services.items()):
            for svc in services:
                spec = svc.get("spec") or {}
                selector = spec.get("selector") or {}
                chosen = sorted(
                    (
                        w
                        for w in live
                        if w.namespace == ns and labels_match(selector, w.pod["metadata"].get("labels") or {})
                    ),
                    key=lambda w: w.name,
                )
                usable = [w for w in chosen if w.ready()]
                if spec.get("publishNotReadyAddresses"):
                    usable = usable or [w for w in chosen if w.terminating_until is None]
                if usable:
                    fqdn = f"{svc['metadata']['name']}.{ns}.svc"
                    lines.append(f"{usable[0].ip} {fqdn} {fqdn}.cluster.local")
        lines += [f"{ip} {name}" for name, ip in sorted(self.extra_hosts.items())]
        text = "\n".join(lines) + "\n"
        if text != self.hosts.read_text():
            with self.hosts.open("r+") as f:  # in place: bind mounts hold the inode
                f.write(text)
                f.truncate()

    # --- for tests ------------------------------------------------------------------------------------

    def pod_dir(self, namespace: str, name: str) -> Path:
        """The host directory of the live pod `name` (its volumes under volumes/, container logs)."""
        for w in self.workers.values():
            if (w.namespace, w.name) == (namespace, name) and not w.finished:
                return w.dir
        raise KeyError(f"{namespace}/{name} is not running")

    def logs(self, lines: int = 20) -> str:
        out = []
        for path in sorted((self.workdir / "pods").glob("*/*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.parent.name}/{path.name}\n" + "\n".join(tail))
        return "\n".join(out)


def missing_capability() -> str | None:
    if os.geteuid() != 0:
        return "the pod runner needs root (network and mount namespaces, chroot)"
    for tool in ("ip", "nsenter", "unshare", "buildah"):
        if shutil.which(tool) is None:
            return f"the pod runner needs `{tool}`"
    return None
