"""A private network of Linux network namespaces for chaos tests, and faults injected with iptables.

One "switch" namespace holds a bridge; every node gets its own namespace joined to the bridge by a veth
pair created from inside the switch (the root namespace is never touched: no address, route or link of
the private subnet exists there). Faults are iptables rules inside the node namespaces only:

- `partition(a, b)`: a and b drop each other's packets (both directions, both ends);
- `drop_one_way(src, dst)`: dst drops what comes from src (src still hears dst);
- `isolate(node)`: the node drops everything but loopback;
- `loss(node, p)`: the node drops a random fraction p of its incoming packets;
- `heal()` removes every rule.

`run_in(ns, fn)` runs a function on a thread that entered the namespace (setns), so a test can poll
servers in the private network without a helper process. Needs root, `ip` and `iptables`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"


def missing_capability() -> str | None:
    """Why this machine cannot build the topology, or None when it can."""
    if os.geteuid() != 0:
        return "network-namespace chaos tests need root (ip netns, iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"network-namespace chaos tests need `{tool}` (apt-get install iproute2 iptables)"
    probe = f"etlpprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    try:
        rules = subprocess.run(
            ["ip", "netns", "exec", probe, "iptables", "-A", "INPUT", "-s", "10.0.0.1", "-j", "DROP"],
            capture_output=True,
            text=True,
        )
        if rules.returncode != 0:
            return f"iptables does not work inside a network namespace: {rules.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _sh(*args: str) -> None:
    done = subprocess.run(list(args), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_and_delete(ns: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def sweep_stale(family: str = "etlp") -> list[str]:
    """Delete namespaces `<family><pid>-…` left by test runs whose process is gone (killed mid-run)."""
    removed = []
    names = os.listdir(NETNS_DIR) if os.path.isdir(NETNS_DIR) else []
    for name in names:
        if not name.startswith(family):
            continue
        tag = name[len(family) :].split("-", 1)[0]
        if tag.isdigit() and not _pid_alive(int(tag)):
            _kill_and_delete(name)
            removed.append(name)
    return removed


_libc: ctypes.CDLL | None = None


def _setns(path: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class Node:
    name: str
    ns: str
    address: str


@dataclass
class Topology:
    """Nodes on one bridge in a private subnet `<subnet>.0/24` (the first three octets)."""

    subnet: str = "10.213.7"
    family: str = "etlp"
    prefix: str = ""
    nodes: dict[str, Node] = field(default_factory=dict)
    _next_host: int = 10

    def __post_init__(self) -> None:
        if not self.prefix:
            self.prefix = f"{self.family}{os.getpid()}-"
        self.switch = f"{self.prefix}sw"

    def create(self) -> None:
        sweep_stale(self.family)
        _sh("ip", "netns", "add", self.switch)
        _sh("ip", "-n", self.switch, "link", "set", "lo", "up")
        _sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.switch, "link", "set", "br0", "up")

    def add(self, name: str) -> Node:
        ns = f"{self.prefix}{name}"
        host = self._next_host
        self._next_host += 1
        node = Node(name, ns, f"{self.subnet}.{host}")
        _sh("ip", "netns", "add", ns)
        self.nodes[name] = node
        port = f"p{host}"
        _sh("ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _sh("ip", "-n", self.switch, "link", "set", port, "master", "br0")
        _sh("ip", "-n", self.switch, "link", "set", port, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{node.address}/24", "dev", "eth0")
        _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        return node

    def destroy(self) -> None:
        for node in list(self.nodes.values()):
            _kill_and_delete(node.ns)
        self.nodes.clear()
        _kill_and_delete(self.switch)

    # -- processes ------------------------------------------------------------------------------------

    def popen(
        self, name: str, args: Sequence[str], *, env: dict[str, str], log_path: str
    ) -> subprocess.Popen[bytes]:
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        try:
            return subprocess.Popen(
                ["ip", "netns", "exec", self.nodes[name].ns, *args], stdout=log, stderr=log, env=env
            )
        finally:
            log.close()

    def run_in(self, name: str, fn: Callable[[], T]) -> T:
        """Run `fn` on a fresh thread inside the node's namespace; sockets it opens live there."""
        result: list[T] = []
        error: list[BaseException] = []

        def body() -> None:
            try:
                _setns(f"{NETNS_DIR}/{self.nodes[name].ns}")
                result.append(fn())
            except BaseException as e:  # handed to the caller
                error.append(e)

        thread = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
        thread.start()
        thread.join()
        if error:
            raise error[0]
        return result[0]

    def start_thread(self, name: str, fn: Callable[[], None]) -> threading.Thread:
        """Like run_in, but returns the running thread (for a long-running client)."""

        def body() -> None:
            _setns(f"{NETNS_DIR}/{self.nodes[name].ns}")
            fn()

        thread = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
        thread.start()
        return thread

    # -- faults ---------------------------------------------------------------------------------------

    def iptables(self, name: str, *rule: str) -> None:
        _sh("ip", "netns", "exec", self.nodes[name].ns, "iptables", "-w", *rule)

    def drop_one_way(self, src: str, dst: str) -> None:
        """Packets from src to dst are dropped (at dst's INPUT); dst → src still flows."""
        self.iptables(dst, "-A", "INPUT", "-s", self.nodes[src].address, "-j", "DROP")

    def partition(self, a: str, b: str) -> None:
        for x, y in ((a, b), (b, a)):
            self.iptables(x, "-A", "INPUT", "-s", self.nodes[y].address, "-j", "DROP")
            self.iptables(x, "-A", "OUTPUT", "-d", self.nodes[y].address, "-j", "DROP")

    def cut(self, a: str, others: Sequence[str]) -> None:
        for b in others:
            self.partition(a, b)

    def isolate(self, name: str) -> None:
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self.iptables(name, "-A", chain, flag, "eth0", "-j", "DROP")

    def loss(self, name: str, probability: float) -> None:
        self.iptables(
            name,
            "-A",
            "INPUT",
            "-i",
            "eth0",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            f"{probability}",
            "-j",
            "DROP",
        )

    def heal(self, names: Sequence[str] | None = None) -> None:
        for name in names or list(self.nodes):
            self.iptables(name, "-F", "INPUT")
            self.iptables(name, "-F", "OUTPUT")
