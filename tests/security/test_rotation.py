"""Every certificate of a running cluster is replaced (same CA) while 100,000 records flow: every record
arrives, no election happens, no sidecar registers again, and new handshakes present the new certificates."""

from __future__ import annotations

import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from etlrouter._proto.v1 import admin_pb2
from etlrouter.security.identity import Kind
from tests.e2e.processes import jsonl_offsets, wait_until
from tests.security.conftest import SecureCluster, start_secure_cluster

RECORDS = 100_000
RELOAD_MS = 200


def _term(cluster: SecureCluster) -> tuple[int, str]:
    status = cluster.admin_call("GetClusterStatus", admin_pb2.GetClusterStatusRequest())
    return status.term, status.leader_id  # type: ignore[attr-defined]


def _metric(cluster: SecureCluster, http_port: int, name: str) -> float:
    request = urllib.request.Request(
        f"https://127.0.0.1:{http_port}/metrics",
        headers={"Authorization": f"Bearer {cluster.pki.tokens['viewer']}"},
    )
    with urllib.request.urlopen(request, timeout=10, context=cluster.pki.https()) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def _served_serial(cluster: SecureCluster, port: int) -> int:
    """The serial of the certificate a new handshake on `port` presents."""
    files = cluster.pki.issue("user", "probe", ("viewer",))
    ctx = ssl.create_default_context(cafile=str(cluster.pki.ca.ca_cert_path))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(files.cert), str(files.key))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _file_serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


@pytest.fixture
def rotating_cluster(tmp_path: Path) -> Iterator[SecureCluster]:
    # ~20 s of flow at 5,000 records/s: the rotations happen while batches move.
    cluster = start_secure_cluster(
        tmp_path, records=RECORDS, reload_interval_ms=RELOAD_MS, generator_args=("--rate", "5000")
    )
    yield cluster
    cluster.procs.stop_all()
    cluster.routers.stop_all()


def test_rotating_every_certificate_loses_nothing(rotating_cluster: SecureCluster) -> None:
    cluster = rotating_cluster
    pki = cluster.pki
    wait_until(lambda: len(jsonl_offsets(cluster.sink_file)) > 1000, 60, "records flowing")
    before = _term(cluster)
    parties: list[tuple[Kind, str]] = [("router", n) for n in cluster.routers.ids]
    parties += [("sidecar", s) for s in cluster.sidecars]
    rotations = 0
    while len(set(jsonl_offsets(cluster.sink_file))) < RECORDS // 2 or rotations < 3:
        for kind, name in parties:
            pki.issue(kind, name)
        rotations += 1
        time.sleep(1.5)
        assert rotations < 60, "the pipeline did not get halfway"
    wait_until(lambda: len(set(jsonl_offsets(cluster.sink_file))) >= RECORDS, 180, f"{RECORDS} records")
    assert set(jsonl_offsets(cluster.sink_file)) == set(range(RECORDS))
    assert _term(cluster) == before, "an election happened during the rotation"
    for sidecar_id in cluster.sidecars:
        registrations = cluster.procs.log(sidecar_id).count("registered with the router cluster")
        assert registrations == 1, f"{sidecar_id} registered {registrations} times"
    time.sleep(3 * RELOAD_MS / 1000)
    for node in cluster.routers.ids:
        assert (
            _metric(cluster, cluster.routers.http_ports[node], 'etlrouter_tls_reloads_total{result="ok"}')
            >= 1
        )
        served = _served_serial(cluster, cluster.routers.grpc_ports[node])
        assert served == _file_serial(pki.directory / "ca" / f"router-{node}.crt"), node
    for sidecar_id, (grpc_port, http_port) in cluster.sidecars.items():
        assert _metric(cluster, http_port, 'etlrouter_tls_reloads_total{result="ok"}') >= 1
        assert _served_serial(cluster, grpc_port) == _file_serial(
            pki.directory / "ca" / f"sidecar-{sidecar_id}.crt"
        )
