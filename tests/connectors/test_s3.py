"""s3 sink against a real S3 server (SeaweedFS): one object per batch named by the batch id, a retried batch
overwrites its object, gzip, multipart uploads for large objects."""

from __future__ import annotations

import gzip
import itertools
import os
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from etlrouter.connectors.s3 import S3Sink, object_key
from etlrouter.sdk import Record, serving
from tests.connectors.servers import S3_ACCESS_KEY, S3_SECRET_KEY, s3_client
from tests.sdk.grpc_helpers import channel_to, write

_buckets = itertools.count()


@pytest.fixture
async def s3(s3_endpoint: str) -> AsyncIterator[Any]:
    async with s3_client(s3_endpoint) as client:
        yield client


@pytest.fixture
async def bucket(s3: Any) -> str:
    name = f"lake-{next(_buckets)}"
    await s3.create_bucket(Bucket=name)
    return name


def sink(endpoint: str, bucket: str, **kw: Any) -> S3Sink:
    return S3Sink(
        bucket,
        prefix="orders/",
        endpoint_url=endpoint,
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
        path_style=True,
        **kw,
    )


async def objects(s3: Any, bucket: str) -> dict[str, bytes]:
    listed = await s3.list_objects_v2(Bucket=bucket)
    out = {}
    for item in listed.get("Contents", []):
        response = await s3.get_object(Bucket=bucket, Key=item["Key"])
        async with response["Body"] as body:
            out[item["Key"]] = await body.read()
    return out


def lines(data: bytes) -> list[dict[str, Any]]:
    return [msgspec.json.decode(line) for line in data.splitlines()]


def test_object_keys_follow_the_batch_id() -> None:
    assert object_key("p/", "a1b2:orders/3/100-199", ".jsonl") == "p/a1b2/orders/3/100-199.jsonl"
    assert object_key("", "odd id/../x", ".jsonl") == "odd%20id/%2E%2E/x.jsonl"


async def test_a_batch_becomes_one_object_and_a_retry_overwrites_it(
    s3_endpoint: str, s3: Any, bucket: str
) -> None:
    records = [
        Record(b"k1", b'{"id":1}', {"h": "x"}, 1_700_000_000_001, 100),
        Record(b"\xff", b"two", {}, 0, 101),
    ]
    async with serving(sink(s3_endpoint, bucket)) as host, channel_to(host.address) as channel:
        first = await write(channel, "st1:orders/0/100-101", records)
        retry = await write(channel, "st1:orders/0/100-101", records)
        other = await write(channel, "st1:orders/1/5-5", records[:1], {"prefix": "per-pipeline/"})
    assert (first.written, retry.written, other.written) == (2, 2, 1)
    stored = await objects(s3, bucket)
    assert sorted(stored) == ["orders/st1/orders/0/100-101.jsonl", "per-pipeline/st1/orders/1/5-5.jsonl"]
    assert lines(stored["orders/st1/orders/0/100-101.jsonl"]) == [
        {"batch_id": "st1:orders/0/100-101", "offset": 100, "event_time_ms": 1_700_000_000_001,
         "key": "k1", "value": '{"id":1}', "headers": {"h": "x"}},
        {"batch_id": "st1:orders/0/100-101", "offset": 101, "event_time_ms": 0,
         "key_b64": "/w==", "value": "two", "headers": {}},
    ]  # fmt: skip


async def test_gzip_and_multipart_for_a_large_batch(s3_endpoint: str, s3: Any, bucket: str) -> None:
    # Random hex values, so the gzip body stays above the 5 MiB threshold.
    records = [Record(b"", os.urandom(3000).hex().encode(), {}, 0, i) for i in range(2000)]
    big = sink(
        s3_endpoint, bucket, compress=True, multipart_threshold=5 * 1024 * 1024, part_size=5 * 1024 * 1024
    )
    size = len(big.body("st1:orders/0/0-1999", records))
    assert size > 5 * 1024 * 1024
    async with serving(big) as host, channel_to(host.address) as channel:
        reply = await write(channel, "st1:orders/0/0-1999", records)
    assert reply.written == 2000
    head = await s3.head_object(Bucket=bucket, Key="orders/st1/orders/0/0-1999.jsonl.gz")
    parts = -(-size // (5 * 1024 * 1024))
    assert head["ETag"].strip('"').endswith(f"-{parts}")  # a multipart upload's ETag counts its parts
    stored = await objects(s3, bucket)
    got = lines(gzip.decompress(stored["orders/st1/orders/0/0-1999.jsonl.gz"]))
    assert [r["offset"] for r in got] == list(range(2000))


async def test_an_unreachable_endpoint_fails_the_call_as_retryable(bucket: str) -> None:
    from grpclib.const import Status
    from grpclib.exceptions import GRPCError

    from tests.conftest import free_port

    down = sink(f"http://127.0.0.1:{free_port()}", bucket, timeout_s=2)
    async with serving(down) as host, channel_to(host.address) as channel:
        with pytest.raises(GRPCError) as failed:
            await write(channel, "b", [Record(b"", b"x", {}, 0, 1)])
    assert failed.value.status == Status.UNAVAILABLE
    assert "s3: writing" in str(failed.value.message)


async def test_a_second_seaweedfs_beside_the_tests_own_keeps_its_objects_apart(
    s3_endpoint: str, s3: Any, bucket: str, tmp_path: Any
) -> None:
    # weed names its Unix sockets by port in /tmp, outside the network namespace: a second instance on the
    # default ports read the first one's volumes (CI: dev's SeaweedFS beside this suite's, "volume 31 not
    # found" on GetObject). Each instance now has ports of its own.
    from etlrouter.dev import servers

    await s3.put_object(Bucket=bucket, Key="mine", Body=b"first")
    second = servers.start_seaweedfs(servers.weed_binary(), servers.free_port(), tmp_path / "second")
    try:
        async with s3_client(second.address) as other:
            await other.create_bucket(Bucket="other")
            for i in range(20):
                await other.put_object(Bucket="other", Key=f"k{i}", Body=b"%d" % i)
            for i in range(20):
                reply = await other.get_object(Bucket="other", Key=f"k{i}")
                assert await reply["Body"].read() == b"%d" % i
        reply = await s3.get_object(Bucket=bucket, Key="mine")
        assert await reply["Body"].read() == b"first"
    finally:
        second.stop()
