"""The sidecar injection webhook: a mutating admission webhook the operator serves over TLS.

Pure parts: `parse_review` (AdmissionReview bytes → request, ReviewError naming the bad field), `admit`
(request → AdmissionReview answer, with the JSON patch from `inject.inject_sidecar`) and
`webhook_configuration` (the MutatingWebhookConfiguration manifest). `WebhookServer` is the I/O: it keeps
the CA and serving certificate in a Secret (see certs.py), serves HTTPS, and keeps the configuration's
caBundle and failurePolicy in line with what it serves and what OperatorConfig says.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web
from prometheus_client import Counter

from etlrouter.core.metrics import REGISTRY
from etlrouter.operator import certs, cluster_tls, kube
from etlrouter.operator.controller import OperatorContext
from etlrouter.operator.inject import (
    InjectionError,
    SidecarTls,
    cluster_of,
    has_sidecar,
    inject_sidecar,
    sidecar_spec_from_annotations,
    wants_injection,
)
from etlrouter.operator.issuer import ISSUE_PATH, Issuer
from etlrouter.operator.pipeline import cluster_tls_enabled

log = logging.getLogger(__name__)

# A pod is at most ~1.5 MiB (etcd's limit); a review carries it, and for updates the old one too.
MAX_REVIEW_BYTES = 4 << 20
CONFIGURATION_NAME = "etlrouter-sidecar-injector"
WEBHOOK_NAME = "inject.etlrouter.io"
INJECT_PATH = "/inject"
# Namespaces labelled with this (value "disabled") are never sent to the webhook: the operator's own, so
# that a fail-closed policy cannot block the operator from starting.
NAMESPACE_OPT_OUT = "etlrouter.io/injection"
CERT_CHECK_INTERVAL_S = 3600.0
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

ADMISSIONS = Counter(
    "etlrouter_webhook_admissions_total",
    "Admission reviews answered by the injection webhook, by outcome.",
    ["outcome"],
    registry=REGISTRY,
)


class ReviewError(ValueError):
    """A malformed AdmissionReview; the message names the field."""


@dataclass(frozen=True)
class AdmissionRequest:
    api_version: str
    uid: str
    kind: str
    operation: str
    namespace: str
    object: dict[str, Any]


def parse_review(body: bytes) -> AdmissionRequest:
    if len(body) > MAX_REVIEW_BYTES:
        raise ReviewError(f"AdmissionReview is {len(body)} bytes; the limit is {MAX_REVIEW_BYTES}")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ReviewError(f"AdmissionReview is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ReviewError(f"AdmissionReview must be a JSON object, got {type(doc).__name__}")
    if doc.get("kind") != "AdmissionReview":
        raise ReviewError(f"kind: expected AdmissionReview, got {doc.get('kind')!r}")
    api_version = doc.get("apiVersion")
    if api_version not in ("admission.k8s.io/v1", "admission.k8s.io/v1beta1"):
        raise ReviewError(f"apiVersion: expected admission.k8s.io/v1 or v1beta1, got {api_version!r}")
    request = doc.get("request")
    if not isinstance(request, dict):
        raise ReviewError("request: missing or not an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise ReviewError("request.uid: missing or not a string")
    kind = request.get("kind")
    if not isinstance(kind, dict) or not isinstance(kind.get("kind"), str):
        raise ReviewError("request.kind.kind: missing or not a string")
    operation = request.get("operation")
    if not isinstance(operation, str):
        raise ReviewError("request.operation: missing or not a string")
    obj = request.get("object")
    if operation in ("CREATE", "UPDATE") and not isinstance(obj, dict):
        raise ReviewError(f"request.object: missing or not an object for {operation}")
    return AdmissionRequest(
        api_version=str(api_version),
        uid=uid,
        kind=kind["kind"],
        operation=operation,
        namespace=str(request.get("namespace") or ""),
        object=obj if isinstance(obj, dict) else {},
    )


def _answer(request: AdmissionRequest, response: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": request.api_version,
        "kind": "AdmissionReview",
        "response": {"uid": request.uid, **response},
    }


def needs_sidecar(request: AdmissionRequest) -> bool:
    pod = request.object
    return (
        request.kind == "Pod"
        and request.operation == "CREATE"
        and wants_injection(pod)
        and not has_sidecar(pod)
    )


def admit(
    request: AdmissionRequest,
    *,
    image: str,
    failure_policy: str,
    tls: SidecarTls | InjectionError | None = None,
) -> tuple[dict[str, Any], str]:
    """The AdmissionReview answer for `request`, and an outcome label for the metrics. `tls`: the
    sidecar's TLS settings when its cluster runs TLS (the server looks the cluster up), or why they
    could not be found."""
    pod = request.object
    if request.kind != "Pod" or request.operation != "CREATE" or not wants_injection(pod):
        return _answer(request, {"allowed": True}), "skipped"
    if has_sidecar(pod):
        return _answer(request, {"allowed": True}), "already-injected"
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    try:
        if isinstance(tls, InjectionError):
            raise tls
        spec = replace(sidecar_spec_from_annotations(annotations, image=image), tls=tls)
    except InjectionError as e:
        message = f"etlrouter sidecar injection: {e}"
        if failure_policy == "Fail":
            status = {"code": 400, "reason": "BadRequest", "message": message}
            return _answer(request, {"allowed": False, "status": status}), "rejected"
        return _answer(request, {"allowed": True, "warnings": [message]}), "not-injected"
    patch = inject_sidecar(pod, spec)
    encoded = base64.b64encode(json.dumps(patch).encode()).decode()
    return _answer(request, {"allowed": True, "patchType": "JSONPatch", "patch": encoded}), "injected"


def webhook_configuration(
    ca_bundle: bytes,
    failure_policy: str,
    *,
    service: tuple[str, str] | None = None,
    url: str | None = None,
    name: str = CONFIGURATION_NAME,
    namespace_selector: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The MutatingWebhookConfiguration: the apiserver calls `service` (namespace, name) on 443, or `url`."""
    if (service is None) == (url is None):
        raise ValueError("give exactly one of service and url")
    client_config: dict[str, Any] = {"caBundle": base64.b64encode(ca_bundle).decode()}
    if url is not None:
        client_config["url"] = url
    else:
        assert service is not None
        client_config["service"] = {"namespace": service[0], "name": service[1], "path": INJECT_PATH}
    selector = namespace_selector or {
        "matchExpressions": [{"key": NAMESPACE_OPT_OUT, "operator": "NotIn", "values": ["disabled"]}]
    }
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "etlrouter"}},
        "webhooks": [
            {
                "name": WEBHOOK_NAME,
                "clientConfig": client_config,
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                        "scope": "Namespaced",
                    }
                ],
                "failurePolicy": failure_policy,
                "matchPolicy": "Equivalent",
                "namespaceSelector": dict(selector),
                "sideEffects": "None",
                "admissionReviewVersions": ["v1", "v1beta1"],
                "timeoutSeconds": 10,
                # Another webhook may add containers after us; being called again is harmless (idempotent).
                "reinvocationPolicy": "IfNeeded",
            }
        ],
    }


def operator_namespace(default: str) -> str:
    """Where the operator runs (its certificate Secret lives there): POD_NAMESPACE, the service account's
    namespace, else `default`."""
    if ns := os.environ.get("POD_NAMESPACE"):
        return ns
    with contextlib.suppress(OSError):
        return _SA_NAMESPACE.read_text().strip() or default
    return default


def _decode_secret(secret: Mapping[str, Any] | None) -> dict[str, bytes]:
    data = (secret or {}).get("data") or {}
    out: dict[str, bytes] = {}
    for key, value in data.items():
        with contextlib.suppress(ValueError, TypeError):
            out[key] = base64.b64decode(value)
    return out


class WebhookServer:
    """Serves `POST /inject` over TLS; owns the certificate Secret and the webhook configuration.

    `url` points the configuration at a URL instead of the `webhook_service` Service (tests, operators
    running outside the cluster); `namespace_selector` overrides the default opt-out selector.
    """

    def __init__(
        self,
        ctx: OperatorContext,
        *,
        url: str | None = None,
        namespace: str | None = None,
        namespace_selector: Mapping[str, Any] | None = None,
        configuration_name: str = CONFIGURATION_NAME,
        cert_check_interval_s: float = CERT_CHECK_INTERVAL_S,
        sidecar_validity: dt.timedelta = cluster_tls.SIDECAR_VALIDITY,
    ) -> None:
        self.ctx = ctx
        # Same server, same certificate: sidecars reach the issuer where the apiserver reaches the webhook.
        self.issuer = Issuer(ctx.api, validity=sidecar_validity)
        self.settings = ctx.config.operator
        self.url = url
        self.namespace = namespace or operator_namespace(ctx.namespace or "default")
        self.namespace_selector = namespace_selector
        self.configuration_name = configuration_name
        self.secret_name = f"{self.settings.webhook_service}-certs"
        self.cert_check_interval_s = cert_check_interval_s
        self.names = certs.webhook_names(self.settings.webhook_service, self.namespace)
        self.bundle: certs.CertBundle | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="etlrouter-webhook-"))
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._runner: web.AppRunner | None = None
        self._port = self.settings.webhook.port
        self._task: asyncio.Task[None] | None = None
        self.ready = False

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        await self.refresh_certificates()
        app = web.Application(client_max_size=MAX_REVIEW_BYTES)
        app.router.add_post(INJECT_PATH, self._handle)
        app.router.add_post(ISSUE_PATH, self.issuer.handle)
        app.router.add_get("/healthz", self._healthz)
        listen = self.settings.webhook
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, listen.host, listen.port, ssl_context=self._ssl, reuse_address=True)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self._port = sockets[0].getsockname()[1] if sockets else listen.port
        log.info("injection webhook listening", extra={"fields": {"address": f"{listen.host}:{self._port}"}})
        await self.ensure_configuration()
        self._task = asyncio.create_task(self._rotate_forever(), name="webhook-certificates")
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._dir.exists():  # stop may run twice (a failed start, then shutdown)
            for path in self._dir.iterdir():
                path.unlink()
            self._dir.rmdir()

    # --- certificates -----------------------------------------------------------------------------

    async def refresh_certificates(self) -> bool:
        """Load the Secret, renew what is due (one writer wins; the others adopt its result), and serve
        the stored certificate. True when what is served changed."""
        secrets = kube.Resource("v1", "secrets")
        for _ in range(5):
            secret = await kube.get(self.ctx.api, secrets, self.namespace, self.secret_name)
            stored = certs.CertBundle.from_data(_decode_secret(secret))
            decision = certs.plan(stored, self.names, dt.datetime.now(dt.UTC))
            if decision.action == "reuse":
                assert stored is not None
                return self._serve(stored)
            bundle = certs.carry_out(decision, stored, self.names, dt.datetime.now(dt.UTC))
            metadata: dict[str, Any] = {
                "name": self.secret_name,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/part-of": "etlrouter"},
            }
            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": metadata,
                "data": {k: base64.b64encode(v).decode() for k, v in bundle.to_data().items()},
            }
            try:
                if secret is None:
                    await kube.request(self.ctx.api, "POST", secrets.path(self.namespace), body=body)
                else:
                    # resourceVersion makes this a compare-and-swap: a concurrent replica's write wins.
                    metadata["resourceVersion"] = secret["metadata"]["resourceVersion"]
                    path = secrets.path(self.namespace, self.secret_name)
                    await kube.request(self.ctx.api, "PUT", path, body=body)
            except kube.KubeError as e:
                if e.status == 409:
                    continue  # another replica wrote first: adopt its certificates
                raise
            log.info(
                "webhook certificates written",
                extra={"fields": {"action": decision.action, "reason": decision.reason}},
            )
            return self._serve(bundle)
        raise RuntimeError(f"could not settle the webhook certificates in Secret {self.secret_name}")

    def _serve(self, bundle: certs.CertBundle) -> bool:
        if bundle == self.bundle:
            return False
        cert_file, key_file = self._dir / "tls.crt", self._dir / "tls.key"
        key_file.touch(mode=0o600)
        key_file.write_bytes(bundle.key)
        cert_file.write_bytes(bundle.cert)
        # New connections get the new certificate; the context object stays the same.
        self._ssl.load_cert_chain(cert_file, key_file)
        self.bundle = bundle
        return True

    async def ensure_configuration(self) -> None:
        assert self.bundle is not None
        manifest = webhook_configuration(
            self.bundle.ca_bundle,
            self.settings.failure_policy,
            service=None if self.url else (self.namespace, self.settings.webhook_service),
            url=self.url,
            name=self.configuration_name,
            namespace_selector=self.namespace_selector,
        )
        await kube.apply(self.ctx.api, manifest)

    async def _rotate_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cert_check_interval_s)
            try:
                await self.refresh_certificates()
                await self.ensure_configuration()
            except Exception:
                log.exception("webhook certificate check failed; retrying at the next interval")

    @property
    def issuer_url(self) -> str:
        """Where sidecars ask for their certificate: the webhook's URL or Service, at ISSUE_PATH."""
        if self.url:
            parts = urlsplit(self.url)
            return urlunsplit((parts.scheme, parts.netloc, ISSUE_PATH, "", ""))
        return f"https://{self.settings.webhook_service}.{self.namespace}.svc{ISSUE_PATH}"

    def sidecar_tls(self, namespace: str, cluster: str) -> SidecarTls:
        """What a sidecar of that TLS cluster is injected with (the workload controller uses it too)."""
        assert self.bundle is not None
        return SidecarTls(
            self.issuer_url,
            self.bundle.ca_bundle.decode(),
            cluster_tls.trust_domain(cluster, namespace),
            f"{namespace}/{cluster}",
        )

    async def _tls_of(self, review: AdmissionRequest) -> SidecarTls | InjectionError | None:
        """The sidecar's TLS settings: those of its EtlRouterCluster when that runs TLS; None for a router
        outside any cluster (or a cluster that opted out), which the sidecar reaches in plaintext."""
        if not needs_sidecar(review):
            return None
        annotations = (review.object.get("metadata") or {}).get("annotations") or {}
        key = cluster_of(review.namespace, annotations)
        if key is None:
            return None
        try:
            cluster = await kube.get_object(self.ctx.api, "etlrouterclusters", *key)
        except kube.KubeError as e:
            return InjectionError(f"cannot read EtlRouterCluster {key[0]}/{key[1]}: {e}")
        if cluster is None or not cluster_tls_enabled(cluster):
            return None
        return self.sidecar_tls(*key)

    # --- HTTP -------------------------------------------------------------------------------------

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _handle(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_REVIEW_BYTES:
            ADMISSIONS.labels("malformed").inc()
            return web.json_response(
                {"error": f"AdmissionReview exceeds {MAX_REVIEW_BYTES} bytes"}, status=413
            )
        try:
            body = await request.read()
            review = parse_review(body)
        except web.HTTPRequestEntityTooLarge:
            ADMISSIONS.labels("malformed").inc()
            return web.json_response(
                {"error": f"AdmissionReview exceeds {MAX_REVIEW_BYTES} bytes"}, status=413
            )
        except ReviewError as e:
            ADMISSIONS.labels("malformed").inc()
            log.warning("malformed AdmissionReview", extra={"fields": {"error": str(e)}})
            return web.json_response({"error": f"malformed AdmissionReview: {e}"}, status=400)
        answer, outcome = admit(
            review,
            image=self.settings.sidecar_image,
            failure_policy=self.settings.failure_policy,
            tls=await self._tls_of(review),
        )
        ADMISSIONS.labels(outcome).inc()
        meta = review.object.get("metadata") or {}
        log.info(
            "admission",
            extra={
                "fields": {
                    "outcome": outcome,
                    "namespace": review.namespace,
                    "pod": meta.get("name") or meta.get("generateName") or "",
                }
            },
        )
        return web.json_response(answer)
