"""The injection webhook, called by a real kube-apiserver over TLS (a `url:` clientConfig on loopback)."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import urllib.error
import urllib.request
from typing import Any, Literal

from etlrouter.core.config import Config, ListenConfig, OperatorConfig
from etlrouter.operator.controller import OperatorContext
from etlrouter.operator.inject import SIDECAR_NAME
from etlrouter.operator.kube import KubeError, request
from etlrouter.operator.webhook import WebhookServer
from tests.conftest import free_port
from tests.k8s.conftest import Kube

ANNOTATED = {
    "etlrouter.io/inject": "true",
    "etlrouter.io/router": "10.0.0.1:7400",
    "etlrouter.io/ports": "50051-50052",
}
MWC = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


def pod(
    name: str, annotations: dict[str, str] | None, containers: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if annotations is not None:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": containers or [{"name": "app", "image": "svc:1"}]},
    }


def server(ctx_api: Any, namespace: str, port: int, policy: Literal["Fail", "Ignore"]) -> WebhookServer:
    config = Config(
        operator=OperatorConfig(
            webhook=ListenConfig(host="127.0.0.1", port=port),
            failure_policy=policy,
            sidecar_image="etlrouter:t",
        )
    )
    ctx = OperatorContext(api=ctx_api, config=config, namespace=namespace)
    return WebhookServer(
        ctx,
        url=f"https://127.0.0.1:{port}/inject",
        namespace=namespace,
        # Only this test's namespace: other tests' pods never reach this webhook.
        namespace_selector={"matchLabels": {"etlrouter.io/test": namespace}},
        configuration_name=f"etlrouter-inject-{namespace}",
    )


def post_review(port: int, ca: bytes, body: bytes) -> tuple[int, str]:
    """Synchronous: run it in a thread, the webhook serves in the test's event loop."""
    context = ssl.create_default_context(cadata=ca.decode())
    req = urllib.request.Request(
        f"https://127.0.0.1:{port}/inject",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def test_apiserver_calls_the_webhook_and_stores_pods_with_the_sidecar(
    kube: Kube, namespace: str
) -> None:
    status, body = kube.http.request(
        "PATCH",
        f"/api/v1/namespaces/{namespace}",
        {"metadata": {"labels": {"etlrouter.io/test": namespace}}},
        content_type="application/merge-patch+json",
    )
    assert status == 200, body
    api = await kube.api_client()
    port = free_port()
    webhook = server(api, namespace, port, "Ignore")
    pods = f"/api/v1/namespaces/{namespace}/pods"
    try:
        await webhook.start()
        assert webhook.bundle is not None
        secret = kube.http.get(f"/api/v1/namespaces/{namespace}/secrets/etlrouter-webhook-certs")
        assert base64.b64decode(secret["data"]["ca.crt"]) == webhook.bundle.ca_cert
        config = kube.http.get(f"{MWC}/etlrouter-inject-{namespace}")
        hook = config["webhooks"][0]
        assert base64.b64decode(hook["clientConfig"]["caBundle"]) == webhook.bundle.ca_bundle
        assert hook["failurePolicy"] == "Ignore"

        stored = await request(api, "POST", pods, body=pod("injected", ANNOTATED))
        containers = stored["spec"]["containers"]
        assert [c["name"] for c in containers] == ["app", SIDECAR_NAME]
        args = containers[1]["args"]
        assert containers[1]["image"] == "etlrouter:t"
        assert args[args.index("--router") + 1] == "10.0.0.1:7400"
        assert args[args.index("--scan-ports") + 1] == "50051-50052"
        assert stored["metadata"]["annotations"]["etlrouter.io/injected"] == "true"

        plain = await request(api, "POST", pods, body=pod("plain", None))
        assert [c["name"] for c in plain["spec"]["containers"]] == ["app"]

        already = pod(
            "already", ANNOTATED, [{"name": "app", "image": "a"}, {"name": SIDECAR_NAME, "image": "mine"}]
        )
        kept = await request(api, "POST", pods, body=already)
        assert [(c["name"], c["image"]) for c in kept["spec"]["containers"]] == [
            ("app", "a"),
            (SIDECAR_NAME, "mine"),
        ]

        # Ignore: a pod whose annotations cannot configure a sidecar runs without one.
        unconfigured = await request(
            api, "POST", pods, body=pod("no-router", {"etlrouter.io/inject": "true"})
        )
        assert [c["name"] for c in unconfigured["spec"]["containers"]] == ["app"]

        # A malformed review gets a 400 naming the field; an oversized one a 413.
        code, text = await asyncio.to_thread(
            post_review, port, webhook.bundle.ca_bundle, b'{"kind": "AdmissionReview"}'
        )
        assert code == 400 and "apiVersion: expected admission.k8s.io/v1" in text
        code, text = await asyncio.to_thread(post_review, port, webhook.bundle.ca_bundle, b" " * (5 << 20))
        assert code == 413
        first_ca = webhook.bundle.ca_cert
        await webhook.stop()

        # A restart reuses the stored certificates; Fail blocks a pod the webhook cannot configure.
        webhook = server(api, namespace, port, "Fail")
        await webhook.start()
        assert webhook.bundle is not None and webhook.bundle.ca_cert == first_ca
        assert kube.http.get(f"{MWC}/etlrouter-inject-{namespace}")["webhooks"][0]["failurePolicy"] == "Fail"
        try:
            await request(api, "POST", pods, body=pod("refused", {"etlrouter.io/inject": "true"}))
        except KubeError as e:
            assert e.status == 400
            assert "annotation etlrouter.io/router is required" in e.message
        else:
            raise AssertionError("a pod the webhook cannot configure must be refused under Fail")
        again = await request(api, "POST", pods, body=pod("injected-2", ANNOTATED))
        assert [c["name"] for c in again["spec"]["containers"]] == ["app", SIDECAR_NAME]
    finally:
        await webhook.stop()
        kube.http.request("DELETE", f"{MWC}/etlrouter-inject-{namespace}")
        await api.close()
    assert json.dumps(hook)  # the configuration was read while the webhook ran
