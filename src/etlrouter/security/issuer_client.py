"""A Kubernetes sidecar's certificate from the operator's issuer (docs/security.md).

With `tls.issuer_url` set, the sidecar makes a key at start, sends a CSR with its pod's projected
ServiceAccount token, and writes the certificate, key and CA bundle it gets into `<data_dir>/tls/`; the
`tls.*` the process then runs with point there. A thread renews at 2/3 of the lifetime (new key each
time), rewriting the files atomically, key first; tls.py's reloader picks them up for new connections.
A renewal that fails is retried, more often as expiry nears; the files in use stay until a new pair
arrives.

Blocking on purpose (urllib, a thread): the first certificate is needed before any listener exists, and
renewal must not depend on the event loop being responsive.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from etlrouter.core.config import Config, TlsConfig
from etlrouter.security import pki
from etlrouter.security.context import SecurityError

log = logging.getLogger(__name__)

RENEW_AT = 2 / 3  # of the lifetime, counted from when the certificate arrived
START_DEADLINE_S = 60.0  # the operator may still be starting, or the pod's token not projected yet
REQUEST_TIMEOUT_S = 10.0
MAX_ANSWER_BYTES = 64 << 10


class IssuerError(Exception):
    """The issuer refused, or could not be reached; `retry` says whether asking again can help."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class Issued:
    cert: bytes
    key: bytes
    ca: bytes
    trust_domain: str
    received: dt.datetime
    not_after: dt.datetime

    @property
    def renew_at(self) -> dt.datetime:
        return self.received + (self.not_after - self.received) * RENEW_AT


def _issuer_context(issuer_ca: str) -> ssl.SSLContext:
    """`tls.issuer_ca` is the PEM text itself (what the webhook injects) or a file."""
    if issuer_ca.lstrip().startswith("-----BEGIN"):
        return ssl.create_default_context(cadata=issuer_ca)
    return ssl.create_default_context(cafile=issuer_ca)


class IssuerClient:
    def __init__(self, tls: TlsConfig, directory: Path, sidecar_id: str) -> None:
        self.tls, self.sidecar_id = tls, sidecar_id
        self.directory = Path(directory)
        self.files = pki.CertFiles(
            self.directory / "ca.crt", self.directory / "tls.crt", self.directory / "tls.key"
        )
        try:
            self._ssl = _issuer_context(tls.issuer_ca)
        except (ssl.SSLError, OSError, ValueError) as e:
            raise SecurityError(f"tls.issuer_ca: not a usable PEM CA ({e})") from None
        self.issued: Issued | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one request -----------------------------------------------------------------------------------

    def request(self) -> Issued:
        """A new key and the certificate the issuer signs for it."""
        try:
            token = Path(self.tls.issuer_token_file).read_text().strip()
        except OSError as e:
            raise IssuerError(
                f"tls.issuer_token_file: cannot read {self.tls.issuer_token_file}: {e}", retry=True
            ) from None
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.sidecar_id[:64])]))
            .sign(key, hashes.SHA256())
        )
        body = json.dumps(
            {"csr": csr.public_bytes(serialization.Encoding.PEM).decode(), "sidecar_id": self.sidecar_id}
        ).encode()
        req = urllib.request.Request(
            self.tls.issuer_url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S, context=self._ssl) as r:
                raw = r.read(MAX_ANSWER_BYTES)
        except urllib.error.HTTPError as e:
            detail = e.read(4096).decode(errors="replace")
            with contextlib.suppress(ValueError, AttributeError):
                detail = str(json.loads(detail).get("error", detail))
            # 401/403: this pod may not have a certificate (a token not yet valid is retried all the same:
            # the kubelet may be about to refresh it); 5xx: the issuer or apiserver is busy.
            raise IssuerError(f"the issuer refused ({e.code}): {detail}", retry=e.code != 400) from None
        except (OSError, ssl.SSLError) as e:
            raise IssuerError(
                f"the issuer at {self.tls.issuer_url} cannot be reached: {e}", retry=True
            ) from None
        try:
            answer = json.loads(raw)
            cert_pem, ca_pem = answer["certificate"].encode(), answer["ca"].encode()
            cert = x509.load_pem_x509_certificate(cert_pem)
            trust_domain = str(answer["trust_domain"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IssuerError(f"the issuer's answer is not a certificate: {e!r}", retry=True) from None
        if cert.public_key() != key.public_key():
            raise IssuerError("the issuer's certificate is not for the key that was sent", retry=True)
        return Issued(
            cert_pem,
            pki.key_pem(key),
            ca_pem,
            trust_domain,
            dt.datetime.now(dt.UTC),
            cert.not_valid_after_utc,
        )

    def write(self, issued: Issued) -> None:
        # Key first: a reader that sees the new certificate finds its key (tls.py re-checks the pair).
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        pki.write_atomically(self.files.ca, issued.ca, 0o644)
        pki.write_atomically(self.files.key, issued.key)
        pki.write_atomically(self.files.cert, issued.cert, 0o644)
        self.issued = issued

    # -- at start and in the background ----------------------------------------------------------------

    def obtain(self, deadline_s: float | None = None) -> TlsConfig:
        """The first certificate (retrying until `deadline_s`, START_DEADLINE_S by default), and the
        `tls.*` that use it."""
        deadline = time.monotonic() + (START_DEADLINE_S if deadline_s is None else deadline_s)
        delay = 0.2
        while True:
            try:
                issued = self.request()
                break
            except IssuerError as e:
                if not e.retry or time.monotonic() + delay > deadline:
                    raise SecurityError(
                        f"tls.issuer_url: no certificate for sidecar {self.sidecar_id}: {e}"
                    ) from None
                log.info("no certificate from the issuer yet, retrying: %s", e)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.write(issued)
        log.info(
            "sidecar certificate obtained",
            extra={
                "fields": {"not_after": issued.not_after.isoformat(), "renew_at": issued.renew_at.isoformat()}
            },
        )
        return msgspec.structs.replace(
            self.tls,
            ca=str(self.files.ca),
            cert=str(self.files.cert),
            key=str(self.files.key),
            trust_domain=issued.trust_domain,
        )

    def renew_once(self) -> bool:
        try:
            self.write(self.request())
        except IssuerError as e:
            log.warning("sidecar certificate renewal failed, retrying: %s", e)
            return False
        assert self.issued is not None
        log.info(
            "sidecar certificate renewed", extra={"fields": {"not_after": self.issued.not_after.isoformat()}}
        )
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            assert self.issued is not None
            now = dt.datetime.now(dt.UTC)
            wait = (self.issued.renew_at - now).total_seconds()
            if wait > 0 and self._stop.wait(wait):
                return
            if not self.renew_once():
                # Retry every tenth of what is left (at least 1 s, at most a minute).
                left = (self.issued.not_after - dt.datetime.now(dt.UTC)).total_seconds()
                if self._stop.wait(min(max(left / 10, 1.0), 60.0)):
                    return

    def start_renewal(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sidecar-certificate-renewal", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=REQUEST_TIMEOUT_S + 1)


def prepare(config: Config, sidecar_id: str) -> Config:
    """`config` with its `tls.*` pointing at a certificate from the issuer, renewed in the background;
    unchanged when `tls.issuer_url` is not set. Raises SecurityError when no certificate comes."""
    if not config.tls.issuer_url:
        return config
    client = IssuerClient(config.tls, Path(config.sidecar.data_dir) / "tls", sidecar_id)
    tls = client.obtain()
    client.start_renewal()
    return msgspec.structs.replace(config, tls=tls)
