"""Sidecar certificates through the issuer, on a real kube-apiserver: the webhook injects the issuer's
settings and a projected token volume; a token minted with the TokenRequest API (bound to the Pod, as the
kubelet would project it) gets the real issuer client a certificate naming `sidecar/<pod name>` from the
cluster's CA, renewed at 2/3 of its life; other tokens and pods are refused."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from cryptography import x509

from etlrouter.core.config import AuthConfig, Config, ListenConfig, OperatorConfig, SidecarConfig, TlsConfig
from etlrouter.operator.cluster import ClusterReconciler
from etlrouter.operator.controller import OperatorContext
from etlrouter.operator.inject import ISSUER_AUDIENCE, SIDECAR_NAME, TOKEN_FILE, TOKEN_VOLUME
from etlrouter.operator.webhook import WebhookServer
from etlrouter.security import issuer_client
from etlrouter.security.context import Security, SecurityError
from etlrouter.security.issuer_client import IssuerClient, IssuerError
from etlrouter.security.tls import TlsMaterial
from tests.conftest import free_port
from tests.k8s.conftest import Kube

BASE = "/apis/etlrouter.io/v1alpha1"
MWC = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
_T = TypeVar("_T")


@dataclass
class Setup:
    kube: Kube
    namespace: str
    webhook: WebhookServer
    tmp: Path

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, answer = self.kube.http.request("POST", path, body)
        assert status in (200, 201), f"POST {path}: {status} {answer}"
        return dict(answer)

    async def pod(
        self, name: str, annotations: dict[str, str] | None, account: str = "app"
    ) -> dict[str, Any]:
        """Created from a thread: the apiserver calls the webhook, which serves in this event loop."""
        meta: dict[str, Any] = {"name": name}
        if annotations is not None:
            meta["annotations"] = annotations
        return await asyncio.to_thread(
            self.post,
            f"/api/v1/namespaces/{self.namespace}/pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": meta,
                "spec": {"serviceAccountName": account, "containers": [{"name": "app", "image": "svc:1"}]},
            },
        )

    def token(
        self, pod: dict[str, Any] | None, audience: str = ISSUER_AUDIENCE, account: str = "app"
    ) -> Path:
        """What the kubelet projects into the pod: a token of its ServiceAccount bound to the pod."""
        spec: dict[str, Any] = {"audiences": [audience], "expirationSeconds": 600}
        if pod is not None:
            meta = pod["metadata"]
            spec["boundObjectRef"] = {
                "kind": "Pod",
                "apiVersion": "v1",
                "name": meta["name"],
                "uid": meta["uid"],
            }
        answer = self.post(
            f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        path = self.tmp / f"token-{time.monotonic_ns()}"
        path.write_text(answer["status"]["token"])
        return path

    def sidecar_tls(self, pod: dict[str, Any], token_file: Path) -> TlsConfig:
        """The sidecar's `tls.*` as the webhook injected them, the token read from `token_file`."""
        sidecar = next(c for c in pod["spec"]["containers"] if c["name"] == SIDECAR_NAME)
        env = {e["name"]: e.get("value") for e in sidecar["env"]}
        assert env["ETLROUTER_TLS__ISSUER_TOKEN_FILE"] == TOKEN_FILE
        return TlsConfig(
            issuer_url=env["ETLROUTER_TLS__ISSUER_URL"],
            issuer_ca=env["ETLROUTER_TLS__ISSUER_CA"],
            issuer_token_file=str(token_file),
            trust_domain=env["ETLROUTER_TLS__TRUST_DOMAIN"],
        )


@pytest.fixture
async def setup(kube: Kube, crds: list[str], namespace: str, tmp_path: Path) -> AsyncIterator[Setup]:
    status, body = kube.http.request(
        "PATCH",
        f"/api/v1/namespaces/{namespace}",
        {"metadata": {"labels": {"etlrouter.io/test": namespace}}},
        content_type="application/merge-patch+json",
    )
    assert status == 200, body
    api = await kube.api_client()
    port = free_port()
    config = Config(
        operator=OperatorConfig(
            webhook=ListenConfig(host="127.0.0.1", port=port), sidecar_image="etlrouter:t"
        )
    )
    ctx = OperatorContext(api=api, config=config, namespace=namespace)
    webhook = WebhookServer(
        ctx,
        url=f"https://127.0.0.1:{port}/inject",
        namespace=namespace,
        namespace_selector={"matchLabels": {"etlrouter.io/test": namespace}},
        configuration_name=f"etlrouter-inject-{namespace}",
    )
    reconciler = ClusterReconciler(ctx)
    try:
        await webhook.start()
        s = Setup(kube, namespace, webhook, tmp_path)
        for name, spec in (("main", {"replicas": 1}), ("plain", {"replicas": 1, "tls": {"enabled": False}})):
            s.post(
                f"{BASE}/namespaces/{namespace}/etlrouterclusters",
                {
                    "apiVersion": "etlrouter.io/v1alpha1",
                    "kind": "EtlRouterCluster",
                    "metadata": {"name": name},
                    "spec": spec,
                },
            )
            await reconciler.reconcile((namespace, name))  # main's CA Secret exists from here on
        s.post(
            f"/api/v1/namespaces/{namespace}/serviceaccounts",
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "app"}},
        )
        yield s
    finally:
        await webhook.stop()
        ctx.credentials.close()
        kube.http.request("DELETE", f"{MWC}/etlrouter-inject-{namespace}")
        await api.close()


def wants_sidecar(router: str) -> dict[str, str]:
    return {"etlrouter.io/inject": "true", "etlrouter.io/router": router, "etlrouter.io/ports": "50051"}


async def refused(client: IssuerClient, *, settle: bool = True) -> str:
    """Why the issuer refuses `client`. `settle`: the token is valid, so an "invalid bearer token" only
    means the apiserver's cache has not seen the new pod yet; ask again until it has."""
    deadline = time.monotonic() + 15
    while True:
        try:
            await asyncio.to_thread(client.request)
        except IssuerError as e:
            if settle and "invalid bearer token" in str(e) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                continue
            return str(e)
        raise AssertionError("the issuer signed a request it must refuse")


async def until(what: str, check: Callable[[], _T | None], timeout: float = 20.0) -> _T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def test_an_injected_pod_gets_its_sidecar_certificate_and_renews_it(setup: Setup) -> None:
    ns = setup.namespace
    pod = await setup.pod("web", wants_sidecar(f"main-client.{ns}.svc:7400"))
    # The webhook injected the issuer's settings and the projected, audience-bound token.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    source = volumes[TOKEN_VOLUME]["projected"]["sources"][0]["serviceAccountToken"]
    assert source["audience"] == ISSUER_AUDIENCE
    assert pod["metadata"]["annotations"]["etlrouter.io/injected"] == "true"
    token = setup.token(pod)
    tls = setup.sidecar_tls(pod, token)
    assert tls.issuer_url == f"https://127.0.0.1:{setup.webhook.port}/v1/sidecar-certificate"
    assert setup.webhook.bundle is not None and tls.issuer_ca == setup.webhook.bundle.ca_bundle.decode()
    td = f"main.{ns}.etlrouter"
    assert tls.trust_domain == td

    # The sidecar's start: the real issuer client, then the Security the sidecar role builds from it.
    data_dir = setup.tmp / "sidecar"
    config = Config(tls=tls, sidecar=SidecarConfig(id="web", data_dir=str(data_dir)))
    client = IssuerClient(config.tls, data_dir / "tls", "web")
    secured = msgspec.structs.replace(config, tls=await asyncio.to_thread(client.obtain, 10.0))
    assert secured.tls.cert == str(data_dir / "tls" / "tls.crt")
    security = Security(secured.tls, AuthConfig(), kind="sidecar", name="web")
    assert security.identity is not None and security.identity.uri == f"spiffe://{td}/ns/{ns}/sidecar/web"
    ca = setup.kube.http.get(f"/api/v1/namespaces/{ns}/secrets/main-ca")
    ca_cert = x509.load_pem_x509_certificate(base64.b64decode(ca["data"]["ca.crt"]))
    issued = x509.load_pem_x509_certificate((data_dir / "tls" / "tls.crt").read_bytes())
    issued.verify_directly_issued_by(ca_cert)
    lifetime = issued.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(hours=23) < lifetime <= dt.timedelta(hours=24)
    assert (data_dir / "tls" / "ca.crt").read_bytes() == base64.b64decode(ca["data"]["ca.crt"])
    assert (data_dir / "tls" / "tls.key").stat().st_mode & 0o077 == 0

    # Renewal at 2/3 of the lifetime: a 3-second certificate is replaced after ~2 s with a new key, and
    # the running process's TLS material picks the new pair up.
    setup.webhook.issuer.validity = dt.timedelta(seconds=3)
    short = IssuerClient(config.tls, setup.tmp / "short", "web")
    short_tls = await asyncio.to_thread(short.obtain, 10.0)
    material = TlsMaterial(short_tls)
    first = material.not_after
    key_file = Path(short_tls.key)
    first_key = key_file.read_bytes()  # noqa: ASYNC240 (a small local file)
    short.start_renewal()
    try:
        await until(
            "the renewed certificate", lambda: material.reload_if_changed() and material.not_after != first
        )
    finally:
        await asyncio.to_thread(short.stop)
    assert material.not_after is not None and first is not None and material.not_after > first
    assert key_file.read_bytes() != first_key  # noqa: ASYNC240


async def test_the_issuer_refuses_other_tokens_and_pods(setup: Setup) -> None:
    ns = setup.namespace
    web = await setup.pod("web", wants_sidecar(f"main-client.{ns}.svc:7400"))
    good = setup.sidecar_tls(web, setup.token(web))

    def client(token: Path | str, sidecar_id: str = "web") -> IssuerClient:
        if isinstance(token, str):
            path = setup.tmp / f"raw-{time.monotonic_ns()}"
            path.write_text(token)
            token = path
        return IssuerClient(
            msgspec.structs.replace(good, issuer_token_file=str(token)), setup.tmp / "x", sidecar_id
        )

    # The positive control first (it also waits for the apiserver's cache to know the pod).
    await asyncio.to_thread(client(Path(good.issuer_token_file)).obtain, 15.0)
    text = await refused(client("garbage.not.a-jwt"), settle=False)
    assert "(401)" in text and "refused by the apiserver" in text
    # Another pod's id with web's token.
    text = await refused(client(Path(good.issuer_token_file), sidecar_id="db"))
    assert "(403)" in text and "the token is pod 'web'" in text
    # A token of the right account but for the apiserver's audience, and one bound to no pod.
    wrong_audience = client(setup.token(web, audience="https://kubernetes.default.svc"))
    assert "(401)" in await refused(wrong_audience, settle=False)
    text = await refused(client(setup.token(None)))
    assert "(401)" in text and "not bound to a pod" in text
    # A pod without a sidecar.
    plain = await setup.pod("plain", None)
    assert [c["name"] for c in plain["spec"]["containers"]] == ["app"]
    text = await refused(client(setup.token(plain), sidecar_id="plain"))
    assert "(403)" in text and "has no injected etlrouter sidecar" in text
    # An injected pod of a cluster without TLS: injected in plaintext, and refused a certificate.
    other = await setup.pod("other", wants_sidecar(f"plain-client.{ns}.svc:7400"))
    sidecar = next(c for c in other["spec"]["containers"] if c["name"] == SIDECAR_NAME)
    assert not any(e["name"].startswith("ETLROUTER_TLS__") for e in sidecar["env"])
    text = await refused(client(setup.token(other), sidecar_id="other"))
    assert "(403)" in text and "runs without TLS" in text
    # The pod is gone: its token is no longer good.
    kept = setup.token(web)
    status, _ = setup.kube.http.request("DELETE", f"/api/v1/namespaces/{ns}/pods/web?gracePeriodSeconds=0")
    assert status == 200

    async def gone() -> str:
        try:
            await asyncio.to_thread(client(kept).request)
        except IssuerError as e:
            return str(e)
        return ""

    deadline = time.monotonic() + 20
    text = ""
    while time.monotonic() < deadline and not (text := await gone()):
        await asyncio.sleep(0.2)
    assert "(401)" in text or "(403)" in text, text

    # The sidecar role's hook fails its start with one line naming the setting.
    config = Config(
        tls=msgspec.structs.replace(good, issuer_token_file=str(kept)),
        sidecar=SidecarConfig(id="web", data_dir=str(setup.tmp / "failed")),
    )
    original = issuer_client.START_DEADLINE_S
    try:
        issuer_client.START_DEADLINE_S = 1.0
        with pytest.raises(SecurityError, match=r"tls\.issuer_url: no certificate for sidecar web"):
            await asyncio.to_thread(issuer_client.prepare, config, "web")
    finally:
        issuer_client.START_DEADLINE_S = original
