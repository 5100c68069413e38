"""Whether a request may be queued: the checks that run on the event loop before any
tokenization, each failure a precise status (see rpcstatus).

Why apart from the servicer: these are pure functions of the request, the configuration
and the model's state, so every rule is testable without a server, and the servicer keeps
only the translation between protobuf and the batcher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from grpc import StatusCode as Code

from modelcache.config import BatchingConfig
from modelcache.daemon import batcher as b
from modelcache.daemon.inference import ModelCompute
from modelcache.daemon.registry import ModelEntry, ModelRegistry, ModelState
from modelcache.daemon.rpcstatus import ServingError
from modelcache.v1 import modelcache_pb2 as pb


@dataclass(frozen=True)
class ServedModel:
    """A READY model with its compute and its batcher (created by the server)."""

    compute: ModelCompute
    batcher: b.Batcher


def find_entry(registry: ModelRegistry, name: str) -> ModelEntry:
    """The configured model ``name`` (INVALID_ARGUMENT without one, NOT_FOUND if unknown)."""
    if not name:
        raise ServingError(Code.INVALID_ARGUMENT, "model is required")
    try:
        return registry.entry(name)
    except KeyError:
        names = ", ".join(registry.names())
        shown = repr(name) if len(name) <= 100 else f"{name[:100]!r}... ({len(name)} chars)"
        raise ServingError(
            Code.NOT_FOUND, f"model {shown} is not configured (configured: {names})"
        ) from None


def check_task(entry: ModelEntry, task: str, method: str) -> None:
    """The RPC must fit the model's task (FAILED_PRECONDITION naming the RPC that does)."""
    if entry.spec.task != task:
        other = "LogProbs" if entry.spec.task == "causal-lm" else "Embed"
        article = "an" if task[0] in "aeiou" else "a"
        raise ServingError(
            Code.FAILED_PRECONDITION,
            f"model {entry.spec.name!r} is a "
            f"{entry.spec.task} model; {method} needs {article} {task} "
            f"model (use {other})",
        )


def check_texts(texts: Sequence[str], field: str, cfg: BatchingConfig) -> None:
    if len(texts) > cfg.max_inputs_per_request:
        raise ServingError(
            Code.INVALID_ARGUMENT,
            f"{len(texts)} {field}; at most {cfg.max_inputs_per_request} per request",
        )
    for i, t in enumerate(texts):
        if not t:
            raise ServingError(Code.INVALID_ARGUMENT, f"{field}[{i}] is empty")
        if len(t) > cfg.max_input_chars:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"{field}[{i}] has {len(t)} characters; at most {cfg.max_input_chars}",
            )


def count_sequences(req: pb.EmbedRequest | pb.LogProbsRequest, cfg: BatchingConfig) -> int:
    """Exactly one of text inputs and pre-tokenized sequences, within the per-request
    limit; returns how many sequences the request has."""
    if req.inputs and req.token_ids:
        raise ServingError(
            Code.INVALID_ARGUMENT,
            "exactly one of inputs and token_ids must be set (both is)",
        )
    if req.inputs:
        check_texts(req.inputs, "inputs", cfg)
    elif len(req.token_ids) > cfg.max_inputs_per_request:
        raise ServingError(
            Code.INVALID_ARGUMENT,
            f"{len(req.token_ids)} token_ids; at most {cfg.max_inputs_per_request} per request",
        )
    return len(req.inputs) or len(req.token_ids)


def check_ready(entry: ModelEntry, served: ServedModel | None, n: int) -> ServedModel:
    """The model serves and its queue has room for ``n`` sequences: FAILED_PRECONDITION
    for a failed model, UNAVAILABLE while it loads or after its device was lost,
    RESOURCE_EXHAUSTED when its queue is full (answered at once, nothing queued)."""
    name = entry.spec.name
    if entry.state is ModelState.FAILED:
        raise ServingError(
            Code.FAILED_PRECONDITION,
            f"model {name!r} failed to load ({entry.error_class}): {entry.error}",
        )
    if served is None or entry.state is not ModelState.READY:
        raise ServingError(
            Code.UNAVAILABLE,
            f"model {name!r} is not ready yet (state {entry.state.value}); retry later",
        )
    if served.batcher.device_lost:
        raise ServingError(Code.UNAVAILABLE, served.batcher.device_lost)
    if served.batcher.failure:
        raise ServingError(
            Code.FAILED_PRECONDITION, f"model {name!r} failed: {served.batcher.failure}"
        )
    if not served.batcher.has_room(n):
        raise ServingError(Code.RESOURCE_EXHAUSTED, f"model {name!r}: queue full")
    return served
