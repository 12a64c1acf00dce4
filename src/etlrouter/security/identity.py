"""Who is calling: identities read from a verified peer certificate or a bearer token.

The scheme (docs/security.md): every party holds a certificate from the cluster's CA whose URI SAN is a
SPIFFE-style ID in the cluster's trust domain,

    spiffe://TRUST_DOMAIN[/ns/NAMESPACE]/router/NODE_ID
    spiffe://TRUST_DOMAIN[/ns/NAMESPACE]/sidecar/SIDECAR_ID
    spiffe://TRUST_DOMAIN[/ns/NAMESPACE]/user/NAME      (people and tools; roles in the subject's O=)

A person's roles ride in the certificate's Organization attributes, as Kubernetes reads a client
certificate's groups; a token's roles come from the token file. Pure: no I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["router", "sidecar", "user", "anonymous"]
KINDS: tuple[Kind, ...] = ("router", "sidecar", "user")
# What a client expects to reach (core/grpc.py open_channel).
ROUTER: tuple[Kind, ...] = ("router",)
SIDECAR: tuple[Kind, ...] = ("sidecar",)
SPIFFE = "spiffe://"


class IdentityError(ValueError):
    """A certificate or ID that does not name a party of this trust domain."""


@dataclass(frozen=True)
class Identity:
    kind: Kind
    name: str
    roles: frozenset[str] = field(default_factory=frozenset)
    # "certificate", "token" or "none": how the caller proved who it is (for logs and denials).
    via: str = "certificate"
    uri: str = ""

    def __str__(self) -> str:
        if self.kind == "anonymous":
            return "anonymous"
        return self.uri or f"{self.via}:{self.kind}/{self.name}"


ANONYMOUS = Identity("anonymous", "", via="none")


def spiffe_id(trust_domain: str, kind: Kind, name: str, namespace: str = "") -> str:
    if kind not in KINDS:
        raise IdentityError(f"unknown identity kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not name or "/" in name:
        raise IdentityError(f"identity name {name!r} must be non-empty and contain no '/'")
    ns = f"/ns/{namespace}" if namespace else ""
    return f"{SPIFFE}{trust_domain}{ns}/{kind}/{name}"


def parse_spiffe_id(uri: str, trust_domain: str) -> tuple[Kind, str]:
    """(kind, name) of a SPIFFE-style ID of `trust_domain`; raises IdentityError naming the problem."""
    if not uri.startswith(SPIFFE):
        raise IdentityError(f"{uri!r} is not a spiffe:// ID")
    domain, _, path = uri[len(SPIFFE) :].partition("/")
    if domain != trust_domain:
        raise IdentityError(f"{uri!r} is not in the trust domain {trust_domain!r}")
    parts = path.split("/")
    if len(parts) >= 2 and parts[0] == "ns":
        parts = parts[2:]
    if len(parts) != 2 or parts[0] not in KINDS or not parts[1]:
        raise IdentityError(f"{uri!r}: expected …/router/ID, …/sidecar/ID or …/user/NAME")
    kind: Kind = parts[0]
    return kind, parts[1]


def _subject_values(cert: Mapping[str, Any], attribute: str) -> list[str]:
    return [value for rdn in cert.get("subject", ()) for key, value in rdn if key == attribute]


def from_peer_cert(cert: Mapping[str, Any] | None, trust_domain: str) -> Identity | None:
    """The identity in a verified peer certificate (`SSLObject.getpeercert()`), None when there is none.

    The chain was verified by the TLS handshake against the CA bundle; here we only read who it names.
    """
    if not cert:
        return None
    uris = [value for key, value in cert.get("subjectAltName", ()) if key == "URI"]
    ours = [u for u in uris if u.startswith(f"{SPIFFE}{trust_domain}/")]
    if len(ours) != 1:
        found = ", ".join(uris) or "no URI SAN"
        raise IdentityError(f"the certificate must carry exactly one ID of {trust_domain!r} (found {found})")
    kind, name = parse_spiffe_id(ours[0], trust_domain)
    roles = frozenset(_subject_values(cert, "organizationName")) if kind == "user" else frozenset()
    return Identity(kind, name, roles, "certificate", ours[0])


def token_identity(name: str, roles: Iterable[str]) -> Identity:
    return Identity("user", name, frozenset(roles), "token")
