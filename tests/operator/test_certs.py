"""Webhook certificates: what `plan` decides for each stored state, and that the result serves real TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path

from cryptography import x509

from etlrouter.operator import certs

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
NAMES = certs.webhook_names("etlrouter-webhook", "ops")


def fresh() -> certs.CertBundle:
    bundle = certs.carry_out(certs.plan(None, NAMES, NOW), None, NAMES, NOW)
    return bundle


def test_nothing_stored_means_a_new_ca() -> None:
    assert certs.plan(None, NAMES, NOW).action == "new-ca"
    assert certs.CertBundle.from_data({"ca.crt": b"x"}) is None


def test_a_fresh_bundle_is_reused_and_round_trips_through_secret_data() -> None:
    bundle = fresh()
    assert certs.plan(bundle, NAMES, NOW) == certs.Plan("reuse", "valid")
    assert certs.CertBundle.from_data(bundle.to_data()) == bundle
    cert = x509.load_pem_x509_certificate(bundle.cert)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(bundle.ca_cert))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "etlrouter-webhook.ops.svc" in sans.get_values_for_type(x509.DNSName)


def test_serving_certificate_is_renewed_from_the_same_ca_before_expiry() -> None:
    bundle = fresh()
    late = NOW + certs.CERT_VALIDITY * 0.8
    decision = certs.plan(bundle, NAMES, late)
    assert decision.action == "renew-cert"
    assert "expires" in decision.reason
    renewed = certs.carry_out(decision, bundle, NAMES, late)
    assert renewed.ca_cert == bundle.ca_cert and renewed.cert != bundle.cert
    assert certs.plan(renewed, NAMES, late).action == "reuse"


def test_new_names_renew_the_certificate() -> None:
    decision = certs.plan(fresh(), [*NAMES, "other.example"], NOW)
    assert decision.action == "renew-cert"
    assert "other.example" in decision.reason


def test_ca_is_replaced_before_expiry_and_the_old_one_stays_trusted() -> None:
    bundle = fresh()
    late = NOW + certs.CA_VALIDITY * 0.9
    decision = certs.plan(bundle, NAMES, late)
    assert decision.action == "new-ca"
    rotated = certs.carry_out(decision, bundle, NAMES, late)
    assert rotated.ca_cert != bundle.ca_cert
    assert rotated.ca_bundle == rotated.ca_cert + bundle.ca_cert
    assert certs.plan(rotated, NAMES, late).action == "reuse"


def test_garbage_or_foreign_certificates_are_replaced() -> None:
    bundle = fresh()
    garbage = certs.CertBundle(b"junk", bundle.ca_key, bundle.cert, bundle.key)
    assert certs.plan(garbage, NAMES, NOW).action == "new-ca"
    other = fresh()
    foreign = certs.CertBundle(bundle.ca_cert, bundle.ca_key, other.cert, other.key)
    assert certs.plan(foreign, NAMES, NOW) == certs.Plan(
        "renew-cert", "the serving certificate was not issued by the stored CA"
    )


async def test_the_bundle_serves_tls_that_a_client_trusting_the_ca_bundle_accepts(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    bundle = certs.carry_out(certs.plan(None, NAMES, now), None, NAMES, now)
    (tmp_path / "tls.crt").write_bytes(bundle.cert)
    (tmp_path / "tls.key").write_bytes(bundle.key)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    async with server:
        client_ctx = ssl.create_default_context(cadata=bundle.ca_bundle.decode())
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        writer.write(b"ping\n")
        assert await reader.readline() == b"ping\n"
        writer.close()
        stranger = ssl.create_default_context(cadata=fresh().ca_cert.decode())
        try:
            await asyncio.open_connection("127.0.0.1", port, ssl=stranger)
        except ssl.SSLCertVerificationError:
            pass
        else:
            raise AssertionError("a client trusting another CA must refuse the certificate")
