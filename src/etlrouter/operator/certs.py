"""The webhook's own CA and serving certificate, and the pure decision of when to make new ones.

The operator keeps both in one Secret so every replica (and a restarted one) serves the same certificate
and the MutatingWebhookConfiguration's caBundle stays valid. `plan` looks at what the Secret holds and
answers what to do: reuse it, issue a new serving certificate from the same CA, or start over with a new
CA. While a CA is replaced the caBundle carries the old CA too, so an apiserver that still has the old
bundle keeps trusting what the replicas serve.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from etlrouter.security import pki
from etlrouter.security.pki import CA_VALIDITY, CERT_VALIDITY

# Renew when less than this fraction of the lifetime is left.
RENEW_FRACTION = 1 / 3

CA_CERT, CA_KEY, TLS_CERT, TLS_KEY, CA_PREVIOUS = "ca.crt", "ca.key", "tls.crt", "tls.key", "ca-previous.crt"


@dataclass(frozen=True)
class CertBundle:
    ca_cert: bytes
    ca_key: bytes
    cert: bytes
    key: bytes
    previous_ca: bytes = b""

    def to_data(self) -> dict[str, bytes]:
        data = {CA_CERT: self.ca_cert, CA_KEY: self.ca_key, TLS_CERT: self.cert, TLS_KEY: self.key}
        if self.previous_ca:
            data[CA_PREVIOUS] = self.previous_ca
        return data

    @classmethod
    def from_data(cls, data: Mapping[str, bytes]) -> CertBundle | None:
        """The bundle a Secret's (decoded) data holds, or None when a part is missing."""
        if not all(data.get(k) for k in (CA_CERT, CA_KEY, TLS_CERT, TLS_KEY)):
            return None
        return cls(data[CA_CERT], data[CA_KEY], data[TLS_CERT], data[TLS_KEY], data.get(CA_PREVIOUS, b""))

    @property
    def ca_bundle(self) -> bytes:
        """What the apiserver must trust: the CA, and during a CA change the previous one."""
        return self.ca_cert + self.previous_ca


@dataclass(frozen=True)
class Plan:
    action: str  # "reuse" | "renew-cert" | "new-ca"
    reason: str


def issue_cert(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    names: Sequence[str],
    now: dt.datetime,
    validity: dt.timedelta = CERT_VALIDITY,
) -> tuple[bytes, bytes]:
    """A serving certificate for `names` (DNS names or IP addresses) signed by the CA."""
    if not names:
        raise ValueError("a serving certificate needs at least one name")
    return pki.issue_cert(ca_cert_pem, ca_key_pem, names, now, validity)


def new_ca(now: dt.datetime) -> tuple[bytes, bytes]:
    return pki.new_ca(now, CA_VALIDITY, common_name="etlrouter-webhook-ca")


def _due(cert: x509.Certificate, now: dt.datetime) -> bool:
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - now < lifetime * RENEW_FRACTION


def plan(bundle: CertBundle | None, names: Sequence[str], now: dt.datetime) -> Plan:
    """What to do with the certificates a Secret holds (pure: no key is generated here)."""
    if bundle is None:
        return Plan("new-ca", "no certificates stored yet")
    try:
        ca = x509.load_pem_x509_certificate(bundle.ca_cert)
        serialization.load_pem_private_key(bundle.ca_key, password=None)
    except ValueError as e:
        return Plan("new-ca", f"the stored CA is unreadable: {e}")
    if _due(ca, now):
        return Plan("new-ca", f"the CA expires at {ca.not_valid_after_utc.isoformat()}")
    try:
        cert = x509.load_pem_x509_certificate(bundle.cert)
        serialization.load_pem_private_key(bundle.key, password=None)
    except ValueError as e:
        return Plan("renew-cert", f"the stored serving certificate is unreadable: {e}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return Plan("renew-cert", "the serving certificate was not issued by the stored CA")
    if _due(cert, now):
        return Plan(
            "renew-cert", f"the serving certificate expires at {cert.not_valid_after_utc.isoformat()}"
        )
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return Plan("renew-cert", "the serving certificate has no subject alternative names")
    have = {str(v) for v in sans.get_values_for_type(x509.DNSName)}
    have |= {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
    missing = sorted(set(names) - have)
    if missing:
        return Plan("renew-cert", f"the serving certificate does not name {', '.join(missing)}")
    return Plan("reuse", "valid")


def carry_out(plan_: Plan, bundle: CertBundle | None, names: Sequence[str], now: dt.datetime) -> CertBundle:
    """The bundle to store and serve after `plan_` (generates keys for the non-reuse actions)."""
    if plan_.action == "reuse":
        assert bundle is not None
        return bundle
    if plan_.action == "renew-cert" and bundle is not None:
        cert, key = issue_cert(bundle.ca_cert, bundle.ca_key, names, now)
        return CertBundle(bundle.ca_cert, bundle.ca_key, cert, key, bundle.previous_ca)
    ca_cert, ca_key = new_ca(now)
    cert, key = issue_cert(ca_cert, ca_key, names, now)
    previous = b""
    if bundle is not None:
        try:  # keep trusting the old CA while it is still valid
            old = x509.load_pem_x509_certificate(bundle.ca_cert)
            if old.not_valid_after_utc > now:
                previous = bundle.ca_cert
        except ValueError:
            pass
    return CertBundle(ca_cert, ca_key, cert, key, previous)


def expires_at(cert_pem: bytes) -> dt.datetime:
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


def webhook_names(service: str, namespace: str) -> list[str]:
    """The names the apiserver may use to reach the webhook: the Service's DNS forms, and loopback."""
    return [
        f"{service}.{namespace}.svc",
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc.cluster.local",
        "127.0.0.1",
        "localhost",
    ]
