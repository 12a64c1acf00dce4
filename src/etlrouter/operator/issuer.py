"""The sidecar certificate issuer: `POST /v1/sidecar-certificate` on the webhook's HTTPS server.

A pod's name is not known at admission (generateName is resolved after mutating webhooks), so no per-pod
Secret can be mounted; instead the sidecar proves which pod it runs in, as Dapr Sentry and Linkerd's
identity service do. The request carries a CSR, and the pod's projected ServiceAccount token (audience
`etlrouter-issuer`) as a bearer token. The issuer
1. asks the apiserver (TokenReview) whether the token is valid for that audience: a bound token names its
   pod (`authentication.kubernetes.io/pod-name` / `pod-uid` in the user's extra), and the apiserver
   refuses it once that pod is gone;
2. reads the pod: same uid, not being deleted, the webhook's `etlrouter.io/injected` annotation, run by
   the token's ServiceAccount, and the sidecar id it asks for is the pod's name;
3. reads the pod's EtlRouterCluster: TLS on, and the pod's namespace is the cluster's or one it lists in
   `spec.tls.sidecarNamespaces`;
4. signs `spiffe://TD/ns/<pod namespace>/sidecar/<pod name>` with the cluster's CA (24 h), whatever the
   CSR asked for: only the CSR's public key is used.

Pure parts: `parse_request`, `public_key_of`, `pod_of_review`, `check_pod`, `check_cluster`, `sign`.
`Issuer.handle` is the I/O.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import Counter

from etlrouter.core.metrics import REGISTRY
from etlrouter.operator import cluster_tls, kube, tls_secrets
from etlrouter.operator.cluster_tls import ClusterCA
from etlrouter.operator.inject import INJECTED_ANNOTATION, ISSUER_AUDIENCE, cluster_of

log = logging.getLogger(__name__)

ISSUE_PATH = "/v1/sidecar-certificate"
MAX_REQUEST_BYTES = 64 << 10
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
SA_PREFIX = "system:serviceaccount:"
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"

ISSUED = Counter(
    "etlrouter_issuer_requests_total",
    "Sidecar certificate requests answered by the issuer, by outcome (issued, or the refusal's kind).",
    ["outcome"],
    registry=REGISTRY,
)


class Refused(Exception):
    """A request the issuer will not sign: `status` (HTTP) and a message saying which check failed."""

    def __init__(self, status: int, outcome: str, message: str) -> None:
        super().__init__(message)
        self.status, self.outcome, self.message = status, outcome, message


@dataclass(frozen=True)
class IssueRequest:
    csr: bytes
    sidecar_id: str  # what the sidecar runs as: must be its pod's name


@dataclass(frozen=True)
class PodIdentity:
    """Who a valid token belongs to, as the apiserver says."""

    namespace: str
    service_account: str
    pod_name: str
    pod_uid: str


def parse_request(body: bytes) -> IssueRequest:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise Refused(400, "malformed", f"the request is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise Refused(400, "malformed", "the request must be a JSON object")
    csr, sidecar_id = doc.get("csr"), doc.get("sidecar_id")
    if not isinstance(csr, str) or not csr:
        raise Refused(400, "malformed", "csr: missing (a PEM certificate signing request)")
    if not isinstance(sidecar_id, str) or not sidecar_id:
        raise Refused(400, "malformed", "sidecar_id: missing (the id the sidecar runs as)")
    return IssueRequest(csr.encode(), sidecar_id)


def public_key_of(csr_pem: bytes) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """The CSR's public key, once its signature proves the requester holds the private key."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise Refused(400, "bad-csr", f"csr: not a PEM certificate signing request ({e})") from None
    if not csr.is_signature_valid:
        raise Refused(400, "bad-csr", "csr: its signature does not verify")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in ("secp256r1", "secp384r1"):
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
        return key
    raise Refused(400, "bad-csr", "csr: the key must be EC P-256/P-384 or RSA of at least 2048 bits")


def pod_of_review(review: Mapping[str, Any]) -> PodIdentity:
    """The pod a TokenReview's answer vouches for; Refused(401) unless the token is a valid bound token of
    a pod's ServiceAccount."""
    status = review.get("status") or {}
    if not status.get("authenticated"):
        error = status.get("error") or "not authenticated"
        raise Refused(401, "bad-token", f"the token was refused by the apiserver: {error}")
    user = status.get("user") or {}
    username = str(user.get("username") or "")
    if not username.startswith(SA_PREFIX) or username.count(":") != 3:
        raise Refused(401, "bad-token", f"the token is not a ServiceAccount's (it is {username!r})")
    namespace, service_account = username[len(SA_PREFIX) :].split(":")
    extra = user.get("extra") or {}
    names, uids = extra.get(POD_NAME_EXTRA) or [], extra.get(POD_UID_EXTRA) or []
    if len(names) != 1 or len(uids) != 1:
        raise Refused(
            401, "bad-token", "the token is not bound to a pod (use a projected serviceAccountToken volume)"
        )
    return PodIdentity(namespace, service_account, str(names[0]), str(uids[0]))


def check_pod(pod: Mapping[str, Any] | None, who: PodIdentity, sidecar_id: str) -> tuple[str, str]:
    """The (namespace, name) of the cluster the token's pod is a sidecar of; Refused(403) naming the
    check that failed."""
    if pod is None:
        raise Refused(403, "no-pod", f"pod {who.namespace}/{who.pod_name} does not exist")
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    if meta.get("uid") != who.pod_uid:
        raise Refused(
            403, "no-pod", f"pod {who.namespace}/{who.pod_name} is not the pod the token was made for"
        )
    if meta.get("deletionTimestamp"):
        raise Refused(403, "no-pod", f"pod {who.namespace}/{who.pod_name} is being deleted")
    if (spec.get("serviceAccountName") or "default") != who.service_account:
        raise Refused(403, "wrong-account", "the token's ServiceAccount does not run that pod")
    annotations = meta.get("annotations") or {}
    if str(annotations.get(INJECTED_ANNOTATION, "")).lower() != "true":
        raise Refused(
            403, "not-injected", f"pod {who.namespace}/{who.pod_name} has no injected etlrouter sidecar"
        )
    if sidecar_id != who.pod_name:
        raise Refused(
            403,
            "wrong-id",
            f"sidecar_id {sidecar_id!r}: the token is pod {who.pod_name!r}'s (the id is the pod name)",
        )
    cluster = cluster_of(who.namespace, annotations)
    if cluster is None:
        raise Refused(403, "no-cluster", f"pod {who.namespace}/{who.pod_name} names no EtlRouterCluster")
    return cluster


def check_cluster(cluster: Mapping[str, Any] | None, key: tuple[str, str], pod_namespace: str) -> None:
    if cluster is None:
        raise Refused(403, "no-cluster", f"EtlRouterCluster {key[0]}/{key[1]} does not exist")
    tls = (cluster.get("spec") or {}).get("tls") or {}
    if not tls.get("enabled", True):
        raise Refused(403, "tls-off", f"EtlRouterCluster {key[0]}/{key[1]} runs without TLS")
    allowed = {key[0], *(tls.get("sidecarNamespaces") or [])}
    if pod_namespace not in allowed and "*" not in allowed:
        raise Refused(
            403,
            "namespace",
            f"EtlRouterCluster {key[0]}/{key[1]} takes sidecars from {', '.join(sorted(allowed))} only "
            "(spec.tls.sidecarNamespaces)",
        )


def sign(
    ca: ClusterCA,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    uri: str,
    common_name: str,
    now: dt.datetime,
    validity: dt.timedelta,
) -> bytes:
    """A client-and-server certificate whose only identity is `uri` (and the DNS name scrapers verify,
    `etlrouter-metrics`: no identity, the same on every sidecar)."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the cluster CA key is not an EC key")
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))  # a little clock skew between nodes
        .not_valid_after(min(now + validity, ca_cert.not_valid_after_utc))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(uri), x509.DNSName(cluster_tls.METRICS_SERVER_NAME)]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


class Issuer:
    """The issuing endpoint's I/O: TokenReview, the pod, the cluster and its CA from the apiserver."""

    def __init__(
        self,
        api: kube.ApiClient,
        *,
        validity: dt.timedelta = cluster_tls.SIDECAR_VALIDITY,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.api, self.validity, self.clock = api, validity, clock

    async def issue(self, token: str, body: bytes) -> dict[str, Any]:
        """The answer for one request; Refused says why not."""
        request = parse_request(body)
        public_key = public_key_of(request.csr)
        review = await kube.request(
            self.api,
            "POST",
            TOKEN_REVIEWS,
            body={
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": token, "audiences": [ISSUER_AUDIENCE]},
            },
        )
        who = pod_of_review(review)
        pod = await kube.get(self.api, kube.Resource("v1", "pods"), who.namespace, who.pod_name)
        key = check_pod(pod, who, request.sidecar_id)
        cluster = await kube.get_object(self.api, "etlrouterclusters", *key)
        check_cluster(cluster, key, who.namespace)
        assert cluster is not None
        cluster.setdefault("apiVersion", kube.API_VERSION)
        cluster.setdefault("kind", "EtlRouterCluster")
        secret_name = ((cluster.get("spec") or {}).get("tls") or {}).get("secretName")
        ca = await tls_secrets.load_ca(self.api, cluster, secret_name)
        if ca is None:
            raise Refused(503, "no-ca", f"EtlRouterCluster {key[0]}/{key[1]} has no CA yet; retry shortly")
        uri = cluster_tls.sidecar_id(key[1], key[0], who.namespace, who.pod_name)
        now = self.clock()
        cert = sign(ca, public_key, uri, who.pod_name, now, self.validity)
        log.info(
            "sidecar certificate issued",
            extra={"fields": {"pod": f"{who.namespace}/{who.pod_name}", "identity": uri}},
        )
        return {
            "certificate": cert.decode(),
            "ca": ca.bundle.decode(),
            "trust_domain": cluster_tls.trust_domain(key[1], key[0]),
            "identity": uri,
        }

    async def handle(self, request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        try:
            if not authorization.lower().startswith("bearer ") or not authorization[7:].strip():
                raise Refused(
                    401, "bad-token", "an Authorization: Bearer header with the pod's token is required"
                )
            if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES:
                raise Refused(413, "malformed", f"the request exceeds {MAX_REQUEST_BYTES} bytes")
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise Refused(413, "malformed", f"the request exceeds {MAX_REQUEST_BYTES} bytes") from None
            answer = await self.issue(authorization[7:].strip(), body)
        except Refused as e:
            ISSUED.labels(e.outcome).inc()
            log.warning(
                "sidecar certificate refused",
                extra={"fields": {"outcome": e.outcome, "error": e.message, "peer": request.remote or ""}},
            )
            return web.json_response({"error": e.message}, status=e.status)
        except kube.KubeError as e:
            ISSUED.labels("apiserver").inc()
            log.warning("sidecar certificate: apiserver error", extra={"fields": {"error": str(e)}})
            return web.json_response({"error": f"the apiserver did not answer: {e.reason}"}, status=503)
        ISSUED.labels("issued").inc()
        return web.json_response(answer)
