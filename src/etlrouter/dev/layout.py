"""Port layout of `etlrouter dev`: fixed offsets from a base port, or free ports when the base is 0.

routers   gRPC  BASE+0 ..        HTTP  BASE+80 ..
services  gRPC  BASE+100 ..
sidecars  gRPC  BASE+200 ..      HTTP  BASE+280 ..
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass

ROUTER_GRPC, ROUTER_HTTP, SERVICE, SIDECAR_GRPC, SIDECAR_HTTP = 0, 80, 100, 200, 280
MAX_PER_GROUP = 80
HOST = "127.0.0.1"


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class Layout:
    router_grpc: tuple[int, ...]
    router_http: tuple[int, ...]
    service: tuple[int, ...]
    sidecar_grpc: tuple[int, ...]
    sidecar_http: tuple[int, ...]

    def all_ports(self) -> list[int]:
        return [
            *self.router_grpc,
            *self.router_http,
            *self.service,
            *self.sidecar_grpc,
            *self.sidecar_http,
        ]


def fixed_layout(base: int, routers: int, services: int) -> Layout:
    if routers > MAX_PER_GROUP or services > MAX_PER_GROUP:
        raise LayoutError(f"at most {MAX_PER_GROUP} routers and {MAX_PER_GROUP} services")
    if base + SIDECAR_HTTP + services > 65535:
        raise LayoutError(f"base port {base} leaves no room for the layout (needs up to {SIDECAR_HTTP + 80})")
    return Layout(
        tuple(base + ROUTER_GRPC + i for i in range(routers)),
        tuple(base + ROUTER_HTTP + i for i in range(routers)),
        tuple(base + SERVICE + j for j in range(services)),
        tuple(base + SIDECAR_GRPC + j for j in range(services)),
        tuple(base + SIDECAR_HTTP + j for j in range(services)),
    )


def free_layout(routers: int, services: int) -> Layout:
    """Ports the kernel hands out, all distinct (the sockets stay bound until every port is chosen)."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(2 * routers + 3 * services):
            s = stack.enter_context(socket.socket())
            s.bind((HOST, 0))
            ports.append(int(s.getsockname()[1]))
    it = iter(ports)
    return Layout(
        tuple(next(it) for _ in range(routers)),
        tuple(next(it) for _ in range(routers)),
        tuple(next(it) for _ in range(services)),
        tuple(next(it) for _ in range(services)),
        tuple(next(it) for _ in range(services)),
    )


def make_layout(base: int, routers: int, services: int) -> Layout:
    return free_layout(routers, services) if base == 0 else fixed_layout(base, routers, services)


def busy_ports(ports: list[int]) -> list[int]:
    """The ports among `ports` that something already listens on (or that cannot be bound)."""
    busy: list[int] = []
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is not busy
            try:
                s.bind((HOST, port))
            except OSError:
                busy.append(port)
    return busy
