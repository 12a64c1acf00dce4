"""Python SDK for ETL Router user services: write a source, transform, sink or lookup in a few lines.

    import msgspec
    from etlrouter.sdk import RecordTransform, run

    class Upper(RecordTransform):
        def transform(self, record, options):
            return msgspec.structs.replace(record, value=record.value.upper())

    run(Upper(), port=50051)

See docs/sdk.md.
"""

from etlrouter.sdk.adapters import grpc_handlers
from etlrouter.sdk.errors import (
    ErrorClass,
    OptionsError,
    PermanentError,
    RecordError,
    RejectedError,
    RetryableError,
)
from etlrouter.sdk.push import Pusher, PusherClosedError, PushRefusedError, PushTicket
from etlrouter.sdk.records import Record, records_from_proto, records_to_proto, source_batch
from etlrouter.sdk.server import ServiceHost, run, serve_async, serving
from etlrouter.sdk.services import (
    Capabilities,
    Lookup,
    LookupResult,
    Processed,
    Pulled,
    PushSource,
    RecordTransform,
    Service,
    Sink,
    Source,
    Transform,
    Written,
    WrittenBatches,
)

__all__ = [
    "Capabilities",
    "ErrorClass",
    "Lookup",
    "LookupResult",
    "OptionsError",
    "PermanentError",
    "Processed",
    "Pulled",
    "PushRefusedError",
    "PushSource",
    "PushTicket",
    "Pusher",
    "PusherClosedError",
    "Record",
    "RecordError",
    "RecordTransform",
    "RejectedError",
    "RetryableError",
    "Service",
    "ServiceHost",
    "Sink",
    "Source",
    "Transform",
    "Written",
    "WrittenBatches",
    "grpc_handlers",
    "records_from_proto",
    "records_to_proto",
    "run",
    "serve_async",
    "serving",
    "source_batch",
]
