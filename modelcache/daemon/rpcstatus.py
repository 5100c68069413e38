"""The gRPC status of every failure, the contract clients code against, and per-RPC state.

- ``NOT_FOUND``: the model is not configured.
- ``INVALID_ARGUMENT``: undecodable request bytes, a missing model name, empty inputs or
  empty strings, inputs the tokenizer turns into no tokens at all (whitespace or control
  characters, with a tokenizer that adds no special tokens), too many inputs, an input
  over ``max_input_chars``, an input over
  max_length with ``truncate`` false, ``top_k`` outside 0..20, both or neither of
  ``inputs``/``token_ids``, token ids outside the vocabulary.
- ``FAILED_PRECONDITION``: the RPC does not fit the model's task; or the model *failed*
  (its load, or its worker restarted too often). Not UNAVAILABLE, on purpose: clients retry
  UNAVAILABLE, and a failed model stays failed until someone fixes its files or config, so
  retrying would only add load. The message carries the reason.
- ``UNAVAILABLE``: the model is still pending or loading (retrying is right), or the
  server is shutting down, or the model's device failed (a device-side assert, an illegal
  memory access: the daemon exits to be restarted; retry on another replica).
- ``RESOURCE_EXHAUSTED``: the model's queue is full (answered at once, nothing queued); or
  one of the request's sequences does not fit in the device's memory even alone (the
  message names its token count; batches that merely do not fit are split and retried).
  gRPC itself answers it for messages over ``grpc_max_message_bytes``.
- ``DEADLINE_EXCEEDED``: the deadline passed while the request was queued.
- ``INTERNAL``: the forward pass raised, or the worker died mid-batch; the worker serves on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from grpc import StatusCode as Code

from modelcache.daemon import batcher as b
from modelcache.metrics import REQUEST_DURATION, REQUESTS

_BATCH_CODES: dict[type[b.BatchError], Code] = {
    b.QueueFull: Code.RESOURCE_EXHAUSTED,
    b.ComputeFailed: Code.INTERNAL,
    b.WorkerDied: Code.INTERNAL,
    b.BatcherFailed: Code.FAILED_PRECONDITION,
    b.BatcherStopped: Code.UNAVAILABLE,
    b.DeadlineExpired: Code.DEADLINE_EXCEEDED,
    b.TooLarge: Code.RESOURCE_EXHAUSTED,
    b.DeviceLost: Code.UNAVAILABLE,
}


class ServingError(Exception):
    """A request's failure with the status it is answered with."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def batch_error(exc: b.BatchError) -> ServingError:
    """The batcher's failure of a request, as its status."""
    return ServingError(_BATCH_CODES[type(exc)], str(exc))


def clip(message: str, limit: int = 2048) -> str:
    """A status message travels percent-encoded in the grpc-message trailer, and clients
    drop trailers over 8 KiB (the call then ends RESOURCE_EXHAUSTED instead of with its own
    status): at most ``limit`` UTF-8 bytes, so at most ~6 KiB encoded."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    return data[:limit].decode("utf-8", "ignore") + f"... ({len(data)} bytes in all)"


@dataclass
class RpcCall:
    """Per-RPC state: the metric's model label (set only once the name is known to be
    configured, so arbitrary client strings never become label values) and the deadline."""

    started: float
    model: str = ""
    deadline: float | None = None  # time.monotonic()

    def record(self, method: str, code: Code) -> None:
        REQUESTS.labels(self.model, method, code.name).inc()
        if self.model:
            REQUEST_DURATION.labels(self.model, method, "total").observe(
                time.perf_counter() - self.started
            )
