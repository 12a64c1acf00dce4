"""Certificate authority and certificate issuance: the one place keys and certificates are made.

Used by `etlrouter dev` (a throw-away CA in its data dir), by `etlrouter certs` (your own small CA), by
the operator (the webhook's serving certificate) and by the tests. Keys are EC P-256: small, fast to
handshake (docs/security.md measures the cost).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = dt.timedelta(days=5 * 365)
CERT_VALIDITY = dt.timedelta(days=365)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str, organizations: Sequence[str] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    attributes += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    return x509.Name(attributes)


def new_ca(
    now: dt.datetime, validity: dt.timedelta = CA_VALIDITY, common_name: str = "etlrouter-ca"
) -> tuple[bytes, bytes]:
    """A self-signed CA: (certificate PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
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
    return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)


def _general_names(names: Sequence[str], uris: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri) for uri in uris]
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def issue_cert(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    names: Sequence[str] = (),
    now: dt.datetime | None = None,
    validity: dt.timedelta = CERT_VALIDITY,
    *,
    uris: Sequence[str] = (),
    organizations: Sequence[str] = (),
    common_name: str = "",
    server: bool = True,
    client: bool = False,
) -> tuple[bytes, bytes]:
    """A certificate signed by the CA: (certificate PEM, key PEM).

    `names` are DNS names or IP addresses, `uris` URI SANs (the SPIFFE identity), `organizations` the
    subject's O= attributes (a person's roles, as Kubernetes reads groups from a client certificate).
    """
    if not names and not uris:
        raise ValueError("a certificate needs at least one name or URI")
    now = now or dt.datetime.now(dt.UTC)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + validity, ca_cert.not_valid_after_utc)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name or (names[0] if names else uris[0])[:64], organizations))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_general_names(names, uris)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)


@dataclass(frozen=True)
class CertFiles:
    """Where one party's CA bundle, certificate and key live (what `tls.*` points at)."""

    ca: Path
    cert: Path
    key: Path


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write then rename, so a process re-reading the file never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class LocalCA:
    """A CA kept as two files in a directory (dev's throw-away CA, a small deployment's own CA)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.ca_cert_path = self.directory / "ca.crt"
        self.ca_key_path = self.directory / "ca.key"

    @classmethod
    def open_or_create(cls, directory: Path, now: dt.datetime | None = None) -> LocalCA:
        ca = cls(directory)
        if not (ca.ca_cert_path.exists() and ca.ca_key_path.exists()):
            ca.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            cert, key = new_ca(now or dt.datetime.now(dt.UTC))
            write_atomically(ca.ca_key_path, key)
            write_atomically(ca.ca_cert_path, cert, 0o644)
        return ca

    def issue(
        self,
        name: str,
        *,
        uri: str,
        hosts: Sequence[str] = ("127.0.0.1", "localhost"),
        roles: Sequence[str] = (),
        validity: dt.timedelta = CERT_VALIDITY,
        now: dt.datetime | None = None,
    ) -> CertFiles:
        """Issue (or re-issue) `name.crt` / `name.key` for a party whose identity is `uri`; both client and
        server usage, since every part of the cluster is both."""
        cert, key = issue_cert(
            self.ca_cert_path.read_bytes(),
            self.ca_key_path.read_bytes(),
            hosts,
            now,
            validity,
            uris=[uri],
            organizations=roles,
            common_name=name,
            server=True,
            client=True,
        )
        files = CertFiles(self.ca_cert_path, self.directory / f"{name}.crt", self.directory / f"{name}.key")
        # Key first: a reader that sees the new certificate must find its key (tls.py re-checks the pair).
        write_atomically(files.key, key)
        write_atomically(files.cert, cert, 0o644)
        return files
