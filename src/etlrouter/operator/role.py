"""The `etlrouter operator` role: leader-elected controllers plus the sidecar injection webhook.

Every replica serves /metrics, /healthz, /readyz and the webhook (admission must not depend on which
replica leads). Only the holder of the Lease runs the Manager; losing the Lease stops every reconcile.
Ready = the webhook serves and the replica either leads with every watch listed, or stands by having
seen the Lease.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

from etlrouter.core.config import Config, ListenConfig
from etlrouter.core.runtime import RoleRuntime
from etlrouter.operator.cluster import ClusterReconciler
from etlrouter.operator.controller import Manager, OperatorContext, Reconciler
from etlrouter.operator.election import LeaderElector
from etlrouter.operator.kube import KubeConfigError, api_client
from etlrouter.operator.pipeline import PipelineReconciler
from etlrouter.operator.webhook import WebhookServer, operator_namespace
from etlrouter.operator.workloads import WorkloadReconciler

log = logging.getLogger(__name__)


def reconcilers(ctx: OperatorContext) -> list[Reconciler]:
    return [
        ClusterReconciler(ctx),
        PipelineReconciler(ctx),
        WorkloadReconciler(ctx, "etlsources"),
        WorkloadReconciler(ctx, "etltransforms"),
        WorkloadReconciler(ctx, "etlsinks"),
    ]


class OperatorRole:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.runtime = RoleRuntime(
            "operator",
            grpc_listen=ListenConfig(port=0),
            http_listen=config.operator.http,
            transport_config=config.transport,
            readiness=self.readiness,
        )
        # Pod name when in a pod (unique per replica); plus a random part so a restarted process is new.
        self.identity = f"{os.environ.get('POD_NAME') or socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self.ctx: OperatorContext | None = None
        self.manager: Manager | None = None
        self.elector: LeaderElector | None = None
        self.webhook: WebhookServer | None = None
        self._lock = asyncio.Lock()

    def readiness(self) -> tuple[bool, str]:
        if self.elector is None or self.webhook is None or not self.webhook.ready:
            return False, "starting"
        if not self.elector.observed.is_set():
            return False, "looking at the leader lease"
        if self.elector.is_leader:
            if self.manager is None or not self.manager.synced.is_set():
                return False, "leader: listing resources"
            return True, f"leader ({self.identity})"
        return True, f"standby; leader is {self.elector.holder or 'nobody'}"

    async def start(self) -> None:
        settings = self.config.operator
        try:
            api = await api_client(settings.kubeconfig or None)
        except KubeConfigError as e:
            log.error("cannot start the operator: %s", e)
            raise SystemExit(2) from None
        self.ctx = OperatorContext(api=api, config=self.config, namespace=settings.namespace)
        await self.runtime.start()
        self.webhook = WebhookServer(self.ctx, url=settings.webhook_url or None)
        await self.webhook.start()
        self.ctx.sidecar_tls = self.webhook.sidecar_tls  # workload pods get what injected pods get
        self.elector = LeaderElector(
            api,
            namespace=settings.lease_namespace or operator_namespace("default"),
            name=settings.lease_name,
            identity=self.identity,
            lease_duration_s=settings.lease_duration_s,
            on_started=self._lead,
            on_stopped=self._follow,
        )
        self.elector.start()
        log.info("operator started", extra={"fields": {"identity": self.identity}})

    async def _lead(self) -> None:
        async with self._lock:
            assert self.ctx is not None
            self.manager = Manager(self.ctx, reconcilers(self.ctx), resync_s=self.config.operator.resync_s)
            await self.manager.start()

    async def _follow(self) -> None:
        async with self._lock:
            if self.manager is not None:
                await self.manager.stop()
                self.manager = None

    async def wait(self) -> None:
        await self.runtime.wait()

    async def drain(self) -> None:
        if self.elector is not None:
            await self.elector.stop()  # stops the manager and releases the Lease

    async def stop(self) -> None:
        await self.drain()
        if self.webhook is not None:
            await self.webhook.stop()
        if self.ctx is not None:
            self.ctx.credentials.close()  # the operator's client keys for TLS clusters
            await self.ctx.api.close()
        await self.runtime.stop()
