"""A process's security: its TLS material, the token table, and how a caller's identity is established.

Built once per process from `tls.*` and `auth.*` and handed to every listener and channel it opens
(core/grpc.py, core/http.py). With no `tls.ca` the process runs in plaintext, as before security
existed, and says so with a warning at start: `etlrouter dev --insecure`, tests of other things.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Collection, Mapping
from contextvars import ContextVar
from typing import Any

import msgspec
from cryptography import x509
from cryptography.x509.oid import NameOID

from etlrouter.core.config import AuthConfig, TlsConfig, env_layer
from etlrouter.core.lifecycle import StartupError
from etlrouter.security.identity import ANONYMOUS, Identity, IdentityError, Kind, from_peer_cert
from etlrouter.security.tls import TlsError, TlsMaterial
from etlrouter.security.tokens import TokenFile, TokenFileError

log = logging.getLogger(__name__)

# The identity of the caller of the request being handled (set by the gRPC and HTTP guards).
CALLER: ContextVar[Identity] = ContextVar("etlrouter_caller", default=ANONYMOUS)
BEARER = "bearer "


class Unauthenticated(Exception):
    """The caller presented no usable credentials; the message says what was wrong."""


class SecurityError(StartupError):
    """Security settings that cannot be used: a role exits 2 with this one line naming the setting."""


class Security:
    def __init__(
        self,
        tls: TlsConfig,
        auth: AuthConfig,
        *,
        kind: Kind | None = None,
        name: str = "",
        client_token: str = "",
    ) -> None:
        self.tls_config, self.auth_config = tls, auth
        # A bearer token this process sends on its calls (ctl without a client certificate).
        self.client_token = client_token
        self.enabled = bool(tls.ca)
        self.trust_domain = tls.trust_domain
        self.kind, self.name = kind, name
        try:
            self.tokens = TokenFile.load(auth.tokens_file) if auth.tokens_file else None
            self.material = (
                TlsMaterial(tls, require_client_cert=self.tokens is None or not auth.grpc_tokens)
                if self.enabled
                else None
            )
        except (TlsError, TokenFileError) as e:
            raise SecurityError(str(e)) from None
        self.identity = self._own_identity()

    @classmethod
    def insecure(cls) -> Security:
        return cls(TlsConfig(), AuthConfig())

    def _own_identity(self) -> Identity | None:
        """Who this process is, from its own certificate; a router or sidecar must be the one it runs as."""
        if self.material is None or self.material.cert is None:
            return None
        try:
            identity = from_peer_cert(_peer_cert_dict(self.material.cert.read_bytes()), self.trust_domain)
        except (IdentityError, ValueError, OSError) as e:
            raise SecurityError(f"tls.cert: {self.material.cert}: {e}") from None
        expected = (self.kind, self.name)
        if self.kind is not None and identity is not None and (identity.kind, identity.name) != expected:
            raise SecurityError(
                f"tls.cert: {self.material.cert} names {identity.uri}, but this process runs as "
                f"{self.kind} {self.name!r}"
            )
        return identity

    # -- listeners and channels ----------------------------------------------------------------------

    def grpc_server_context(self) -> ssl.SSLContext | None:
        return self.material.server("h2") if self.material else None

    def http_server_context(self) -> ssl.SSLContext | None:
        """HTTPS for the aiohttp servers: a client certificate is optional there (browsers and probes
        bring none); the guard then asks for a token."""
        return self.material.server("http/1.1", require_client_cert=False) if self.material else None

    def client_context(self) -> ssl.SSLContext | None:
        return self.material.client() if self.material else None

    # -- authentication -------------------------------------------------------------------------------

    def authenticate(self, peer_cert: Mapping[str, Any] | None, authorization: str | None) -> Identity:
        """The caller of one request: its certificate's identity, else its bearer token's."""
        if not self.enabled:
            return ANONYMOUS
        try:
            identity = from_peer_cert(peer_cert, self.trust_domain)
        except IdentityError as e:
            raise Unauthenticated(str(e)) from None
        if identity is not None:
            return identity
        if authorization:
            if not authorization.lower().startswith(BEARER):
                raise Unauthenticated("the authorization header must be `Bearer TOKEN`")
            if self.tokens is None:
                raise Unauthenticated("this server accepts no bearer tokens (auth.tokens_file is not set)")
            found = self.tokens.lookup(authorization[len(BEARER) :].strip())
            if found is None:
                raise Unauthenticated("unknown bearer token")
            return found
        raise Unauthenticated("no client certificate and no bearer token")

    def verify_server(self, peer_cert: Mapping[str, Any] | None, expect: Collection[Kind]) -> Identity:
        """What a client checks after its handshake: the server is a party of our trust domain, of the
        kind it meant to reach (a router, a sidecar)."""
        try:
            identity = from_peer_cert(peer_cert, self.trust_domain)
        except IdentityError as e:
            raise ssl.SSLError(f"server certificate refused: {e}") from None
        if identity is None or (expect and identity.kind not in expect):
            got = identity.uri if identity else "no identity"
            raise ssl.SSLError(f"server certificate refused: expected a {'/'.join(expect)}, got {got}")
        return identity

    # -- rotation -------------------------------------------------------------------------------------

    def warn_if_plaintext(self, what: str) -> None:
        if not self.enabled:
            log.warning(
                "%s listens in plaintext without authentication: anyone who reaches it can call it "
                "(set tls.ca, tls.cert and tls.key; docs/security.md)",
                what,
            )

    async def watch(self) -> None:
        """Re-read certificates and tokens when their files change, until cancelled."""
        interval = self.tls_config.reload_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            try:
                if self.material is not None:
                    self.material.reload_if_changed()
                if self.tokens is not None:
                    self.tokens.refresh()
            except Exception:  # the watcher keeps running: the next check may succeed
                log.exception("re-reading the TLS files or the token file failed")


def _peer_cert_dict(pem: bytes) -> dict[str, Any]:
    """`getpeercert()`'s dict for the first certificate of a PEM file: our own certificate is read with
    the same reader as a peer's."""
    cert = x509.load_pem_x509_certificate(pem)
    subject = tuple(
        ((("organizationName" if a.oid == NameOID.ORGANIZATION_NAME else a.oid._name), str(a.value)),)
        for a in cert.subject
    )
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(("URI", u) for u in sans.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = ()
    return {"subject": subject, "subjectAltName": uris}


def security_from_environment(environ: Mapping[str, str] | None = None) -> Security:
    """The `tls.*` settings of the environment (ETLROUTER_TLS__CA, …) for a process that is not a role
    and loads no config file: an SDK service pushing to its sidecar."""
    layer, _ = env_layer(os.environ if environ is None else environ)
    try:
        tls = msgspec.convert(layer.get("tls", {}), TlsConfig, strict=False)
    except msgspec.ValidationError as e:
        raise SecurityError(f"ETLROUTER_TLS__*: {e}") from None
    return Security(tls, AuthConfig())
