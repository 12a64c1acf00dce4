"""`etlrouter dev`'s throw-away PKI: a CA in its data dir, a certificate per router and sidecar, an admin
certificate and a bearer token for the person at the keyboard. Remade on every start (the data dir is
wiped), so nothing of it outlives the cluster it secured."""

from __future__ import annotations

import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from etlrouter.core.config import AuthConfig, TlsConfig
from etlrouter.dev.layout import HOST
from etlrouter.security.context import Security
from etlrouter.security.identity import Kind, spiffe_id
from etlrouter.security.pki import CertFiles, LocalCA, write_atomically

TRUST_DOMAIN = "etlrouter.local"
ADMIN = "dev-admin"


@dataclass
class DevPki:
    directory: Path
    ca: LocalCA = field(init=False)
    admin: CertFiles = field(init=False)
    token: str = field(init=False)
    tokens_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.ca = LocalCA.open_or_create(self.directory)
        self.admin = self.ca.issue(
            ADMIN, uri=spiffe_id(TRUST_DOMAIN, "user", ADMIN), roles=("admin",), hosts=(HOST,)
        )
        self.token = secrets.token_urlsafe(24)
        self.tokens_file = self.directory / "tokens.csv"
        write_atomically(self.tokens_file, f"# token,user,uid,roles\n{self.token},{ADMIN},0,admin\n".encode())

    def issue(self, kind: Kind, name: str) -> CertFiles:
        return self.ca.issue(name, uri=spiffe_id(TRUST_DOMAIN, kind, name), hosts=(HOST, "localhost"))

    def env(self, files: CertFiles) -> dict[str, str]:
        """What a child process needs to serve and call with mutual TLS (and accept the dev token)."""
        return {
            "ETLROUTER_TLS__CA": str(files.ca),
            "ETLROUTER_TLS__CERT": str(files.cert),
            "ETLROUTER_TLS__KEY": str(files.key),
            "ETLROUTER_TLS__TRUST_DOMAIN": TRUST_DOMAIN,
            "ETLROUTER_AUTH__TOKENS_FILE": str(self.tokens_file),
        }

    def client(self) -> Security:
        """dev's own calls (apply, listings): as the admin."""
        tls = TlsConfig(ca=str(self.admin.ca), cert=str(self.admin.cert), key=str(self.admin.key))
        return Security(tls, AuthConfig())

    def http_context(self) -> ssl.SSLContext:
        """dev's HTTPS client (readiness, /metrics): verifies the servers, presents the admin certificate."""
        ctx = ssl.create_default_context(cafile=str(self.admin.ca))
        ctx.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        return ctx

    def credentials(self) -> dict[str, str]:
        """The ctl context's `credentials`."""
        return {
            "ca": str(self.admin.ca),
            "cert": str(self.admin.cert),
            "key": str(self.admin.key),
            "trust_domain": TRUST_DOMAIN,
        }
