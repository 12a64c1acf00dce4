"""Data-plane flow control: pure, property-tested decisions on batch-level metadata.

- `credits`    credit-based backpressure per edge (records and bytes), bounded receive buffers
- `ledger`     the ack ledger: when a source offset may be acknowledged (at-least-once, in order)
- `watermarks` event-time watermarks per partition, per stage and along a pipeline DAG
- `retry`      gRPC status classification and exponential backoff with full jitter
- `branch`     fan-out branch policies (BLOCK / SHED) and the per-batch fan-out walk
- `gate`       the one asyncio piece: an awaitable wrapper over a credit sender

See docs/adr/0004-flow-control.md for the semantics and the decisions.
"""
