"""TLS material of one process: SSL contexts built from `tls.*`, re-read when the files change.

Rotation without downtime: the contexts are created once and handed to every listener and channel; when
the certificate or key file changes we load the new pair into the *same* context objects, so every new
handshake presents the new certificate while established connections keep theirs until they close. A
pair that does not load (a half-written rotation, a key that does not match) leaves the previous one in
use and is retried at the next check. The CA bundle is re-read too; OpenSSL adds to a context's trust
store but never removes from it, so dropping a CA needs a restart (docs/security.md).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
from pathlib import Path

from cryptography import x509

from etlrouter.core.config import TlsConfig
from etlrouter.core.metrics import TLS_CERT_NOT_AFTER, TLS_RELOADS

log = logging.getLogger(__name__)


class TlsError(Exception):
    """TLS material that cannot be used; the message names the setting and the file."""


def _signature(paths: list[Path]) -> tuple[tuple[int, int, int], ...]:
    out = []
    for p in paths:
        try:
            st = os.stat(p)  # follows symlinks: a Kubernetes Secret volume swaps a `..data` link
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((0, 0, 0))
    return tuple(out)


class TlsMaterial:
    """The contexts of `config`. `server(alpn)` and `client()` always return the same objects."""

    def __init__(self, config: TlsConfig, *, require_client_cert: bool = True) -> None:
        self.config = config
        self.ca = Path(config.ca)
        self.cert = Path(config.cert) if config.cert else None
        self.key = Path(config.key) if config.key else None
        self.require_client_cert = require_client_cert
        self._servers: dict[str, ssl.SSLContext] = {}
        self._client: ssl.SSLContext | None = None
        self._paths = [p for p in (self.ca, self.cert, self.key) if p is not None]
        self._signature = _signature(self._paths)
        self.not_after: dt.datetime | None = None
        self._check_readable()
        self._probe()  # fail at start, naming the file, rather than at the first handshake

    def _check_readable(self) -> None:
        for setting, path in (("tls.ca", self.ca), ("tls.cert", self.cert), ("tls.key", self.key)):
            if path is not None and not os.access(path, os.R_OK):
                raise TlsError(f"{setting}: cannot read {path}")

    def _probe(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._load_ca(ctx)
        self._load_pair(ctx)

    def _load_ca(self, ctx: ssl.SSLContext) -> None:
        try:
            ctx.load_verify_locations(cafile=str(self.ca))
        except (ssl.SSLError, OSError) as e:
            raise TlsError(f"tls.ca: {self.ca}: not a PEM CA bundle ({e})") from None

    def _load_pair(self, ctx: ssl.SSLContext) -> None:
        if self.cert is None or self.key is None:
            return
        try:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        except (ssl.SSLError, OSError) as e:
            raise TlsError(
                f"tls.cert/tls.key: {self.cert} and {self.key} do not load as a pair ({e})"
            ) from None
        self.not_after = certificate_not_after(self.cert)
        TLS_CERT_NOT_AFTER.set(self.not_after.timestamp())

    def _base(self, ctx: ssl.SSLContext, alpn: list[str]) -> ssl.SSLContext:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(alpn)
        self._load_ca(ctx)
        self._load_pair(ctx)
        return ctx

    def server(self, alpn: str = "h2", *, require_client_cert: bool | None = None) -> ssl.SSLContext:
        """The listener context: a client certificate is verified against the CA when one is presented;
        required unless bearer tokens are accepted (then the authorization layer refuses callers without
        either)."""
        required = self.require_client_cert if require_client_cert is None else require_client_cert
        key = f"{alpn}:{required}"
        if key not in self._servers:
            if self.cert is None:
                raise TlsError("tls.cert and tls.key are needed to serve TLS")
            ctx = self._base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), [alpn])
            ctx.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
            self._servers[key] = ctx
        return self._servers[key]

    def client(self) -> ssl.SSLContext:
        """The context of every outgoing connection: the peer must chain to the CA; who it is (its SPIFFE
        ID, not a host name) is checked after the handshake by the channel."""
        if self._client is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_REQUIRED
            self._client = self._base(ctx, ["h2"])
        return self._client

    def contexts(self) -> list[ssl.SSLContext]:
        return [*self._servers.values(), *([self._client] if self._client else [])]

    def reload_if_changed(self) -> bool:
        """Load changed files into every live context; True when new material is in use."""
        signature = _signature(self._paths)
        if signature == self._signature:
            return False
        try:
            self._probe()
        except TlsError as e:
            # Not remembered: the next check tries again (the other file of the pair may be on its way).
            TLS_RELOADS.labels(result="failed").inc()
            log.warning(
                "new TLS files do not load; still using the previous ones",
                extra={"fields": {"error": str(e)}},
            )
            return False
        for ctx in self.contexts():
            self._load_ca(ctx)
            self._load_pair(ctx)
        self._signature = signature
        TLS_RELOADS.labels(result="ok").inc()
        log.info(
            "TLS certificate reloaded",
            extra={
                "fields": {
                    "cert": str(self.cert),
                    "not_after": self.not_after.isoformat() if self.not_after else "",
                }
            },
        )
        return True


def certificate_not_after(path: Path) -> dt.datetime:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc
