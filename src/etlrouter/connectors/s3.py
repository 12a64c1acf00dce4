"""`s3` sink: each batch becomes one object of JSON lines (gzip optional) in an S3-compatible bucket.

    python -m etlrouter.connectors.s3 --port 50073 --bucket lake --prefix orders/ \
        [--endpoint-url http://127.0.0.1:8333 --path-style] [--gzip] [--region us-east-1]

Object key: `<prefix><stage id>/<source>/<partition>/<first offset>-<last offset>.jsonl[.gz]`, read from
the sink batch id (`<stage id>:<source>/<partition>/<first>-<last>`, the sidecar's; any other id is used
as it is, with characters outside `A-Za-z0-9._=-` and `/` percent-encoded). The stage option
`config.prefix` overrides --prefix (e.g. one prefix per pipeline). The key is a function of the batch id
alone, so a retried batch overwrites its own object: retries never create a second object (idempotent
writes), and the gzip stream has no timestamp, so a retry of the same records writes the same bytes.

Lines: the jsonl-file sink's format, one object per record: {"batch_id", "offset", "event_time_ms",
"key" | "key_b64", "value" | "value_b64", "headers"}.

Delivery: a WriteBatch is answered after S3 answered the PUT (or CompleteMultipartUpload) with success,
which in S3's model is durable; no Flush is needed. Objects at or above --multipart-threshold go up as a
multipart upload of --part-size parts (an interrupted upload is aborted). Object size is set by the stage's
batch size: the sink does not roll several batches into one object, which would tie one object to several
acknowledgements and lose the one-batch-one-key idempotency. Every S3 error fails the call as retryable
(with S3's code and message): the sidecar retries, then dead-letters the batch by its policy.
"""

from __future__ import annotations

import contextlib
import gzip
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import click
import msgspec
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from etlrouter.connectors._common import VERSION, invoke, serve_service, server_options
from etlrouter.connectors.jsonl_file_sink import record_line
from etlrouter.sdk import Capabilities, Record, RetryableError, Sink, Written

_encode = msgspec.json.Encoder().encode
_SIDECAR_BATCH_ID = re.compile(r"^(?P<stage>[^:/]+):(?P<source>[^/]+)/(?P<partition>\d+)/(?P<range>\d+-\d+)$")
MIN_PART_SIZE = 5 * 1024 * 1024  # S3's minimum for every part but the last


def _segment(text: str) -> str:
    """One path segment of a key, percent-encoded; never empty, `.` or `..` (no path tricks)."""
    encoded = quote(text, safe="._=-")
    if encoded in ("", ".", ".."):
        return encoded.replace(".", "%2E") or "_"
    return encoded


def object_key(prefix: str, batch_id: str, suffix: str) -> str:
    """The object a batch is written to: a pure function of the prefix and the batch id."""
    match = _SIDECAR_BATCH_ID.match(batch_id)
    parts = (
        [match["stage"], match["source"], match["partition"], match["range"]]
        if match
        else batch_id.split("/")
    )
    return prefix + "/".join(_segment(p) for p in parts) + suffix


class S3Sink(Sink):
    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        path_style: bool = False,
        compress: bool = False,
        multipart_threshold: int = 16 * 1024 * 1024,
        part_size: int = 8 * 1024 * 1024,
        timeout_s: float = 60.0,
        concurrency: int = 4,
    ) -> None:
        if not bucket:
            raise ValueError("--bucket must not be empty")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"--part-size must be at least {MIN_PART_SIZE} bytes (S3's minimum part size)")
        if multipart_threshold < part_size:
            raise ValueError("--multipart-threshold must be at least --part-size")
        if (access_key is None) != (secret_key is None):
            raise ValueError("--access-key-id and --secret-access-key go together")
        self.bucket = bucket
        self.prefix = prefix
        self.suffix = ".jsonl.gz" if compress else ".jsonl"
        self.compress = compress
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.client_options: dict[str, Any] = {
            "endpoint_url": endpoint_url,
            "region_name": region,
            "aws_access_key_id": access_key,
            "aws_secret_access_key": secret_key,
            "config": AioConfig(
                s3={"addressing_style": "path" if path_style else "auto"},
                connect_timeout=min(timeout_s, 10),
                read_timeout=timeout_s,
                retries={"max_attempts": 3, "mode": "standard"},
                # Checksums only where S3 requires them: S3-compatible servers differ in what they accept.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                max_pool_connections=concurrency * 2,
            ),
        }
        self.capabilities = Capabilities(
            name="s3",
            version=VERSION,
            idempotent_writes=True,
            max_concurrency=concurrency,
            labels={"bucket": bucket, "prefix": prefix},
        )
        self._stack = contextlib.AsyncExitStack()
        self.client: Any = None

    async def open(self) -> None:
        self.client = await self._stack.enter_async_context(
            get_session().create_client("s3", **self.client_options)
        )

    async def close(self) -> None:
        await self._stack.aclose()
        self.client = None

    def body(self, batch_id: str, records: list[Record]) -> bytes:
        data = b"".join(_encode(record_line(batch_id, r)) + b"\n" for r in records)
        return gzip.compress(data, compresslevel=6, mtime=0) if self.compress else data

    async def write(self, batch_id: str, records: list[Record], options: Mapping[str, str]) -> Written | None:
        if not records:
            return Written(0)
        key = object_key(options.get("prefix", self.prefix), batch_id, self.suffix)
        body = self.body(batch_id, records)
        content_type = "application/x-ndjson"
        extra = {"ContentEncoding": "gzip"} if self.compress else {}
        try:
            if len(body) < self.multipart_threshold:
                await self.client.put_object(
                    Bucket=self.bucket, Key=key, Body=body, ContentType=content_type, **extra
                )
            else:
                await self._multipart(key, body, content_type, extra)
        except (ClientError, BotoCoreError) as exc:
            raise RetryableError(f"s3: writing s3://{self.bucket}/{key}: {exc}") from exc
        return Written(len(records))

    async def _multipart(self, key: str, body: bytes, content_type: str, extra: dict[str, str]) -> None:
        started = await self.client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType=content_type, **extra
        )
        upload_id = started["UploadId"]
        try:
            parts = []
            view = memoryview(body)
            for number, start in enumerate(range(0, len(body), self.part_size), start=1):
                part = await self.client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=bytes(view[start : start + self.part_size]),
                )
                parts.append({"PartNumber": number, "ETag": part["ETag"]})
            await self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with contextlib.suppress(ClientError, BotoCoreError):
                await self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise


@click.command(name="s3")
@click.option("--bucket", required=True, help="Bucket to write to (must exist).")
@click.option("--prefix", default="", help="Key prefix (the stage option config.prefix overrides it).")
@click.option("--endpoint-url", envvar="ETLROUTER_S3_ENDPOINT_URL", help="Any S3-compatible endpoint.")
@click.option("--region", default="us-east-1", show_default=True)
@click.option("--access-key-id", envvar="AWS_ACCESS_KEY_ID", help="Default: the AWS credential chain.")
@click.option("--secret-access-key", envvar="AWS_SECRET_ACCESS_KEY")
@click.option("--path-style/--virtual-hosted-style", default=False, help="Path-style addressing.")
@click.option("--gzip/--no-gzip", "compress", default=False, show_default=True)
@click.option(
    "--multipart-threshold",
    type=click.IntRange(min=MIN_PART_SIZE),
    default=16 * 1024 * 1024,
    show_default=True,
)
@click.option(
    "--part-size", type=click.IntRange(min=MIN_PART_SIZE), default=8 * 1024 * 1024, show_default=True
)
@click.option("--timeout-s", type=click.FloatRange(min=1), default=60.0, show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True)
@server_options
def cli(
    bucket: str,
    prefix: str,
    endpoint_url: str | None,
    region: str,
    access_key_id: str | None,
    secret_access_key: str | None,
    path_style: bool,
    compress: bool,
    multipart_threshold: int,
    part_size: int,
    timeout_s: float,
    concurrency: int,
    host: str,
    port: int,
    log_level: str,
    log_format: str,
) -> None:
    """Write each batch as one JSON-lines object to an S3-compatible bucket."""
    try:
        service = S3Sink(
            bucket,
            prefix=prefix,
            endpoint_url=endpoint_url,
            region=region,
            access_key=access_key_id,
            secret_key=secret_access_key,
            path_style=path_style,
            compress=compress,
            multipart_threshold=multipart_threshold,
            part_size=part_size,
            timeout_s=timeout_s,
            concurrency=concurrency,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    serve_service(service, host=host, port=port, log_level=log_level, log_format=log_format)


def main(args: Sequence[str] | None = None) -> None:
    invoke(cli, args, "etlrouter.connectors.s3")


if __name__ == "__main__":
    main()
