"""The `etlrouter sidecar` process: discovery, the cluster client, the data plane, the DLQ, the admin API.

Start order matters for at-least-once: the DLQ opens first (the engine must be able to dead-letter), the
data-plane server binds (peers must reach us once the router hands out our address), discovery scans, then
the sidecar registers and applies its assignments. Stop order is the reverse: on SIGTERM the health turns
NOT_SERVING, the engine drains its sources (in-flight batches finish and are acknowledged), the sidecar
deregisters so the router moves its stages, then the servers stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path

from grpclib.exceptions import GRPCError

from etlrouter._proto.v1 import records_pb2
from etlrouter.client.router import ClusterUnreachableError, RouterClient
from etlrouter.core.config import Config, parse_port_list
from etlrouter.core.runtime import RoleRuntime
from etlrouter.security import issuer_client
from etlrouter.security.context import Security
from etlrouter.sidecar.admin import SidecarAdminService, TapHub
from etlrouter.sidecar.cluster import ClusterClient
from etlrouter.sidecar.dataplane import DataPlaneService
from etlrouter.sidecar.discovery import Discovery
from etlrouter.sidecar.dlq import DeadLetterStore
from etlrouter.sidecar.engine import Engine
from etlrouter.sidecar.model import LocalService

log = logging.getLogger(__name__)


class _LateDlq:
    """The engine's DLQ until the store is open (the store opens in start(), inside the event loop)."""

    def __init__(self) -> None:
        self.store: DeadLetterStore | None = None

    async def put(self, letters: object) -> None:
        assert self.store is not None, "dead-letter store not open"
        await self.store.put(letters)  # type: ignore[arg-type]


class SidecarRole:
    def __init__(self, config: Config) -> None:
        self.config = config
        cfg = config.sidecar
        self.sidecar_id = cfg.id or socket.gethostname()
        # tls.issuer_url (Kubernetes): the certificate comes from the operator's issuer, renewed by a thread.
        self.config = config = issuer_client.prepare(config, self.sidecar_id)
        self.security = Security(config.tls, config.auth, kind="sidecar", name=self.sidecar_id)
        self.taps = TapHub()
        self.dlq = _LateDlq()
        self.engine = Engine(
            self.sidecar_id, cfg, config.transport, self.dlq, tap=self._tap, security=self.security
        )
        self.runtime: RoleRuntime | None = None  # built in start(), once the DLQ store is open
        self._stopped = asyncio.Event()
        self.routers = RouterClient(
            list(cfg.routers), timeout=10, transport_config=config.transport, security=self.security
        )
        self.cluster: ClusterClient | None = None
        self.discovery = Discovery(
            self.sidecar_id,
            parse_port_list(cfg.scan_ports),
            host=cfg.scan_host,
            interval_s=cfg.scan_interval_ms / 1000,
            transport_config=config.transport,
        )
        self._heartbeats: asyncio.Task[None] | None = None
        self._rescans: asyncio.Task[None] | None = None

    def _tap(self, dag_id: str, stage_id: str, batch: records_pb2.RawRecordBatch) -> None:
        self.taps.offer(dag_id, stage_id, batch.header.batch_id, batch.records)

    def ready(self) -> tuple[bool, str]:
        if self.cluster is None or not self.cluster.registered:
            return False, "not registered with the router cluster"
        reason = f"registered; {sum(len(d.runners) for d in self.engine.dags.values())} stages running"
        # Ready all the same: the other services run; the rejected ones join once the clash is gone.
        note = self.cluster.readiness_note()
        return True, f"{reason}; {note}" if note else reason

    async def start(self) -> None:
        cfg = self.config.sidecar
        store = await DeadLetterStore.open(Path(cfg.data_dir) / "dlq")
        self.dlq.store = store
        self.runtime = RoleRuntime(
            "sidecar",
            grpc_listen=cfg.grpc,
            http_listen=cfg.http,
            transport_config=self.config.transport,
            grpc_services=[DataPlaneService(self.engine), SidecarAdminService(store, self.engine, self.taps)],
            readiness=self.ready,
            security=self.security,
            feeds=self.engine.feeds,
        )
        await self.runtime.grpc.start()
        data_address = self.runtime.grpc.address
        self.cluster = ClusterClient(
            self.sidecar_id,
            data_address,
            self.routers,
            self.engine,
            heartbeat_interval_s=cfg.heartbeat_interval_ms / 1000,
        )
        services = await self.discovery.scan()
        self._services_changed(services)
        try:
            await self.cluster.register(services, wait=False)
        except (ClusterUnreachableError, GRPCError) as e:
            # Not fatal: the heartbeat loop registers as soon as the cluster answers.
            log.warning("could not register yet, will keep trying: %s", e)
        self._heartbeats = asyncio.ensure_future(self.cluster.run())
        self._rescans = asyncio.ensure_future(self.discovery.run(self._services_changed))
        await self.runtime.start_http()
        log.info(
            "sidecar started",
            extra={
                "fields": {
                    "id": self.sidecar_id,
                    "data": data_address,
                    "services": [s.name for s in services],
                }
            },
        )

    def _services_changed(self, services: list[LocalService]) -> None:
        self.engine.set_services(services)
        if self.cluster is not None:
            self.cluster.update_services(services)

    async def wait(self) -> None:
        await self._stopped.wait()

    async def drain(self) -> None:
        if self.runtime is not None:
            self.runtime.grpc.set_serving(False)
        self.taps.close()  # open Tap streams would otherwise hold the gRPC drain until its deadline
        if self._rescans is not None:
            self._rescans.cancel()  # heartbeats go on while draining, or the router would expire us
        await self.engine.close()  # sources stop pulling; in-flight batches finish and are acknowledged
        if self.cluster is not None:
            await self.cluster.deregister()  # also ends the heartbeat loop

    async def stop(self) -> None:
        for task in (self._heartbeats, self._rescans):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.cluster is not None:
            await self.cluster.close()
        await self.engine.close()
        self.routers.close()
        if self.runtime is not None:
            await self.runtime.stop()
        if self.dlq.store is not None:
            await self.dlq.store.close()
        self._stopped.set()
