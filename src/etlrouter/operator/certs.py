"""The webhook's own CA and serving certificate, and the pure decision of when to make new ones.

The operator keeps both in one Secret so every replica (and a restarted one) serves the same certificate
and the MutatingWebhookConfiguration's caBundle stays valid. `plan` looks at what the Secret holds and
answers what to do: reuse it, issue a new serving certificate from the same CA, or start over with a new
CA. While a CA is replaced the caBundle carries the old CA too, so an apiserver that still has the old
bundle keeps trusting what the replicas serve.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA_VALIDITY = dt.timedelta(days=5 * 365)
CERT_VALIDITY = dt.timedelta(days=365)
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


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def new_ca(now: dt.datetime, validity: dt.timedelta = CA_VALIDITY) -> tuple[bytes, bytes]:
    """A self-signed CA: (certificate PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("etlrouter-webhook-ca")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _sans(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


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
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + validity, ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_sans(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


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
