"""A test cluster's PKI: a CA in a temporary directory, certificates per party, a token file."""

from __future__ import annotations

import secrets
import ssl
from pathlib import Path

from etlrouter.core.config import AuthConfig, TlsConfig
from etlrouter.security.context import Security
from etlrouter.security.identity import Kind, spiffe_id
from etlrouter.security.pki import CertFiles, LocalCA, write_atomically

TRUST_DOMAIN = "etlrouter.test"


class TestPki:
    __test__ = False  # not a test class, for pytest

    def __init__(self, directory: Path, *, reload_interval_ms: int = 5000) -> None:
        self.directory = directory
        self.ca = LocalCA.open_or_create(directory / "ca")
        self.reload_interval_ms = reload_interval_ms
        self.tokens_file = directory / "tokens.csv"
        self.tokens: dict[str, str] = {}  # role -> token
        lines = ["# token,user,uid,roles"]
        for role in ("viewer", "tap", "editor", "admin"):
            self.tokens[role] = secrets.token_urlsafe(24)
            lines.append(f"{self.tokens[role]},{role}-person,0,{role}")
        write_atomically(self.tokens_file, ("\n".join(lines) + "\n").encode())

    def issue(
        self, kind: Kind, name: str, roles: tuple[str, ...] = (), ca: LocalCA | None = None
    ) -> CertFiles:
        return (ca or self.ca).issue(
            f"{kind}-{name}", uri=spiffe_id(TRUST_DOMAIN, kind, name), roles=roles, hosts=("127.0.0.1",)
        )

    def env(self, kind: Kind, name: str) -> dict[str, str]:
        files = self.issue(kind, name)
        return {
            "ETLROUTER_TLS__CA": str(files.ca),
            "ETLROUTER_TLS__CERT": str(files.cert),
            "ETLROUTER_TLS__KEY": str(files.key),
            "ETLROUTER_TLS__TRUST_DOMAIN": TRUST_DOMAIN,
            "ETLROUTER_TLS__RELOAD_INTERVAL_MS": str(self.reload_interval_ms),
            "ETLROUTER_AUTH__TOKENS_FILE": str(self.tokens_file),
        }

    def security(
        self, kind: Kind = "user", name: str = "admin", roles: tuple[str, ...] = ("admin",)
    ) -> Security:
        files = self.issue(kind, name, roles if kind == "user" else ())
        tls = TlsConfig(ca=str(files.ca), cert=str(files.cert), key=str(files.key), trust_domain=TRUST_DOMAIN)
        return Security(tls, AuthConfig())

    def token_security(self, role: str) -> Security:
        """A client with only the CA and a bearer token (no client certificate)."""
        tls = TlsConfig(ca=str(self.ca.ca_cert_path), trust_domain=TRUST_DOMAIN)
        return Security(tls, AuthConfig(), client_token=self.tokens[role])

    def https(self) -> ssl.SSLContext:
        """For urllib: trusts the CA, presents no certificate (probes, token callers)."""
        return ssl.create_default_context(cafile=str(self.ca.ca_cert_path))
