"""The ModelCache gRPC service: protobuf <-> domain types, one precise status per failure.

Status codes, the contract clients code against:

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

Requests arrive as raw bytes (the handlers are registered without a deserializer) so a
message that does not parse is INVALID_ARGUMENT naming the type, not gRPC's generic error.
Tokenization and token-id checks run on the executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message
from grpc import StatusCode as Code

from modelcache.config import BatchingConfig
from modelcache.daemon import batcher as b
from modelcache.daemon.changes import describe_update
from modelcache.daemon.inference import (
    MAX_TOP_K,
    EmbedItem,
    InputError,
    LogProbsItem,
    LogProbsOptions,
    ModelCompute,
)
from modelcache.daemon.loader import versions
from modelcache.daemon.registry import ModelEntry, ModelRegistry, ModelState
from modelcache.metrics import REQUEST_DURATION, REQUESTS
from modelcache.v1 import modelcache_pb2 as pb

log = logging.getLogger(__name__)
SERVICE = "modelcache.v1.ModelCache"
M = TypeVar("M", bound=Message)

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
_STATES = {
    ModelState.PENDING: pb.ModelStatus.PENDING,
    ModelState.LOADING: pb.ModelStatus.LOADING,
    ModelState.READY: pb.ModelStatus.READY,
    ModelState.FAILED: pb.ModelStatus.FAILED,
}


def clip(message: str, limit: int = 2048) -> str:
    """A status message travels percent-encoded in the grpc-message trailer, and clients
    drop trailers over 8 KiB (the call then ends RESOURCE_EXHAUSTED instead of with its own
    status): at most ``limit`` UTF-8 bytes, so at most ~6 KiB encoded."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    return data[:limit].decode("utf-8", "ignore") + f"... ({len(data)} bytes in all)"


class ServingError(Exception):
    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class _Call:
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


@dataclass(frozen=True)
class ServedModel:
    """A READY model with its compute and its batcher (created by the server)."""

    compute: ModelCompute
    batcher: b.Batcher


class ModelCacheServicer:
    def __init__(
        self,
        registry: ModelRegistry,
        cfg: BatchingConfig,
        executor: Executor,
        config_hash: Callable[[], str] = lambda: "",
    ) -> None:
        self.registry, self.cfg, self.executor = registry, cfg, executor
        self.config_hash = config_hash
        self._served: dict[str, ServedModel] = {}
        self._lock = threading.Lock()

    # -- the server attaches a batcher when a model becomes READY --------------------
    def attach(self, name: str, served: ServedModel) -> None:
        with self._lock:
            self._served[name] = served

    def detach(self, name: str) -> ServedModel | None:
        with self._lock:
            return self._served.pop(name, None)

    def served(self) -> dict[str, ServedModel]:
        with self._lock:
            return dict(self._served)

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(fn: Callable[..., Any], resp: type[Message]) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=None, response_serializer=resp.SerializeToString
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Embed": unary(self.Embed, pb.EmbedResponse),
                "LogProbs": unary(self.LogProbs, pb.LogProbsResponse),
                "ListModels": unary(self.ListModels, pb.ListModelsResponse),
            },
        )

    # -- RPCs ------------------------------------------------------------------------
    async def Embed(self, raw: bytes, ctx: grpc.aio.ServicerContext[Any, Any]) -> Message:
        return await self._call("Embed", pb.EmbedRequest, raw, ctx, self._embed)

    async def LogProbs(self, raw: bytes, ctx: grpc.aio.ServicerContext[Any, Any]) -> Message:
        return await self._call("LogProbs", pb.LogProbsRequest, raw, ctx, self._logprobs)

    async def ListModels(self, raw: bytes, ctx: grpc.aio.ServicerContext[Any, Any]) -> Message:
        return await self._call("ListModels", pb.ListModelsRequest, raw, ctx, self._list)

    async def _call(
        self,
        method: str,
        kind: type[M],
        raw: bytes,
        ctx: grpc.aio.ServicerContext[Any, Any],
        impl: Callable[[M, _Call], Awaitable[Message]],
    ) -> Message:
        call = _Call(started=time.perf_counter())
        try:
            try:
                request = kind.FromString(raw)
            except (DecodeError, ValueError) as exc:
                raise ServingError(
                    Code.INVALID_ARGUMENT,
                    f"request is not a valid {kind.DESCRIPTOR.full_name}: {exc}",
                ) from None
            if (remaining := ctx.time_remaining()) is not None:
                call.deadline = time.monotonic() + remaining
            response = await impl(request, call)
        except ServingError as exc:
            error = exc
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed
            left = ctx.time_remaining()
            call.record(
                method, Code.DEADLINE_EXCEEDED if left is not None and left <= 0 else Code.CANCELLED
            )
            raise
        except Exception as exc:
            log.exception("%s failed", method)
            error = ServingError(Code.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        else:
            call.record(method, Code.OK)
            return response
        call.record(method, error.code)  # before abort: the client sees the status at once
        await ctx.abort(error.code, clip(error.message))
        raise AssertionError("unreachable: abort raises")

    # -- shared checks ---------------------------------------------------------------
    def _entry(self, name: str, task: str, method: str, call: _Call) -> ModelEntry:
        if not name:
            raise ServingError(Code.INVALID_ARGUMENT, "model is required")
        try:
            entry = self.registry.entry(name)
        except KeyError:
            names = ", ".join(self.registry.names())
            shown = repr(name) if len(name) <= 100 else f"{name[:100]!r}... ({len(name)} chars)"
            raise ServingError(
                Code.NOT_FOUND, f"model {shown} is not configured (configured: {names})"
            ) from None
        call.model = name
        if entry.spec.task != task:
            other = "LogProbs" if entry.spec.task == "causal-lm" else "Embed"
            article = "an" if task[0] in "aeiou" else "a"
            raise ServingError(
                Code.FAILED_PRECONDITION,
                f"model {name!r} is a "
                f"{entry.spec.task} model; {method} needs {article} {task} "
                f"model (use {other})",
            )
        return entry

    def _texts(self, texts: Sequence[str], field: str) -> None:
        if len(texts) > self.cfg.max_inputs_per_request:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"{len(texts)} {field}; at most {self.cfg.max_inputs_per_request} per request",
            )
        for i, t in enumerate(texts):
            if not t:
                raise ServingError(Code.INVALID_ARGUMENT, f"{field}[{i}] is empty")
            if len(t) > self.cfg.max_input_chars:
                raise ServingError(
                    Code.INVALID_ARGUMENT,
                    f"{field}[{i}] has {len(t)} characters; at most {self.cfg.max_input_chars}",
                )

    def _ready(self, entry: ModelEntry, n: int) -> ServedModel:
        name = entry.spec.name
        served = self.served().get(name)
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

    async def _compute(
        self, served: ServedModel, prepare: Callable[[], list[Any]], call: _Call
    ) -> tuple[list[Any], list[Any]]:
        """Tokenize/check on the executor (the batcher knows a request is on its way, so a
        batch being formed can wait for it), then queue its sequences and await them."""
        batcher = served.batcher
        batcher.expect(+1)
        try:
            items = await asyncio.get_running_loop().run_in_executor(self.executor, prepare)
        except InputError as exc:
            batcher.expect(-1)
            raise ServingError(Code.INVALID_ARGUMENT, str(exc)) from None
        except BaseException:
            batcher.expect(-1)
            raise
        try:
            job = batcher.submit(items, [len(i.ids) for i in items], call.deadline, announced=True)
        except b.BatchError as exc:
            raise ServingError(_BATCH_CODES[type(exc)], str(exc)) from None
        try:
            return items, await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            batcher.cancel(job)
            raise
        except b.BatchError as exc:
            raise ServingError(_BATCH_CODES[type(exc)], str(exc)) from None

    def _inputs_or_ids(self, req: pb.EmbedRequest | pb.LogProbsRequest) -> int:
        """Exactly one of text inputs and pre-tokenized sequences, within the per-request
        limit; returns how many sequences the request has."""
        if req.inputs and req.token_ids:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                "exactly one of inputs and token_ids must be set (both is)",
            )
        if req.inputs:
            self._texts(req.inputs, "inputs")
        elif len(req.token_ids) > self.cfg.max_inputs_per_request:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"{len(req.token_ids)} token_ids; at most "
                f"{self.cfg.max_inputs_per_request} per request",
            )
        return len(req.inputs) or len(req.token_ids)

    # -- Embed -----------------------------------------------------------------------
    async def _embed(self, req: pb.EmbedRequest, call: _Call) -> pb.EmbedResponse:
        entry = self._entry(req.model, "embedding", "Embed", call)
        if not req.inputs and not req.token_ids:
            raise ServingError(Code.INVALID_ARGUMENT, "inputs is empty")
        count = self._inputs_or_ids(req)
        if req.token_ids and req.prompt_name:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                "prompt_name applies to text inputs; token_ids are used as given "
                "(put the prompt's tokens in them)",
            )
        served = self._ready(entry, count)
        compute = served.compute
        try:
            prompt = compute.prompt(req.prompt_name) if req.inputs else ""
        except InputError as exc:
            raise ServingError(Code.INVALID_ARGUMENT, str(exc)) from None
        texts, truncate = [prompt + t for t in req.inputs], req.truncate
        seqs = [list(t.ids) for t in req.token_ids]
        normalize = req.normalize if req.HasField("normalize") else compute.recipe.normalize

        def prepare() -> list[EmbedItem]:
            if texts:
                ids = compute.tokenize(texts, truncate)
            else:
                ids = compute.check_token_ids(seqs, truncate)
            return [EmbedItem(s, normalize) for s in ids]

        items, rows = await self._compute(served, prepare, call)
        matrix = np.stack(rows).astype("<f4", copy=False)
        lm = compute.loaded
        return pb.EmbedResponse(
            model=req.model,
            embeddings=matrix.tobytes(),
            rows=matrix.shape[0],
            dims=matrix.shape[1],
            token_counts=[len(i.ids) for i in items],
            revision=lm.revision,
            fingerprint=lm.fingerprint,
        )

    # -- LogProbs --------------------------------------------------------------------
    async def _logprobs(self, req: pb.LogProbsRequest, call: _Call) -> pb.LogProbsResponse:
        entry = self._entry(req.model, "causal-lm", "LogProbs", call)
        if bool(req.inputs) == bool(req.token_ids):
            which = "both" if req.inputs else "neither"
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"exactly one of inputs and token_ids must be set ({which} is)",
            )
        if req.top_k > MAX_TOP_K:
            raise ServingError(
                Code.INVALID_ARGUMENT, f"top_k {req.top_k} is out of range 0..{MAX_TOP_K}"
            )
        count = self._inputs_or_ids(req)
        served = self._ready(entry, count)
        compute = served.compute
        if req.top_k > compute.vocab_size:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"top_k {req.top_k} is larger than the vocabulary ({compute.vocab_size})",
            )
        opts = LogProbsOptions(
            top_k=req.top_k,
            entropy=req.entropy,
            expected_logprob=req.expected_logprob,
            rank=req.rank,
        )

        def prepare() -> list[LogProbsItem]:
            if req.inputs:
                ids = compute.tokenize(list(req.inputs), req.truncate)
            else:
                ids = compute.check_token_ids([t.ids for t in req.token_ids], req.truncate)
            return [LogProbsItem(s, opts) for s in ids]

        _, stats = await self._compute(served, prepare, call)

        def blob(a: np.ndarray[Any, Any] | None, dtype: str) -> bytes:
            return b"" if a is None else np.ascontiguousarray(a, dtype=dtype).tobytes()

        seqs = [
            pb.SequenceLogProbs(
                token_ids=blob(s.token_ids, "<i4"),
                logprobs=blob(s.logprobs, "<f4"),
                entropy=blob(s.entropy, "<f4"),
                expected_logprob=blob(s.expected_logprob, "<f4"),
                logprob_variance=blob(s.logprob_variance, "<f4"),
                rank=blob(s.rank, "<i4"),
                top_k_ids=blob(s.top_k_ids, "<i4"),
                top_k_logprobs=blob(s.top_k_logprobs, "<f4"),
                num_tokens=len(s.token_ids),
            )
            for s in stats
        ]
        lm = compute.loaded
        return pb.LogProbsResponse(
            model=req.model,
            sequences=seqs,
            top_k=req.top_k,
            revision=lm.revision,
            fingerprint=lm.fingerprint,
        )

    # -- ListModels ------------------------------------------------------------------
    async def _list(self, req: pb.ListModelsRequest, call: _Call) -> pb.ListModelsResponse:
        served = self.served()
        models = [self._status(e, served.get(e.spec.name)) for e in self.registry.entries()]
        return pb.ListModelsResponse(
            models=models, versions=versions(), config_hash=self.config_hash()
        )

    def _status(self, e: ModelEntry, s: ServedModel | None) -> pb.ModelStatus:
        """One model's entry, built defensively: a value protobuf refuses (out of range,
        a string that is not UTF-8) is reported in that model's entry instead of failing
        ListModels for every model, and with it the operator's status probe. Serialized
        here once, because gRPC serializes only after the handler returned."""
        try:
            status = _model_status(e, s)
            status.SerializeToString()
            return status
        except Exception as exc:
            log.warning(
                "ListModels: the status of model %s cannot be reported: %r", e.spec.name, exc
            )
            why = f"{type(exc).__name__}: {exc}".encode("utf-8", "backslashreplace").decode()
            return pb.ModelStatus(
                name=e.spec.name,
                state=_STATES[e.state],
                task=e.spec.task,
                error=clip(f"this model's status cannot be reported: {why}"),
                error_class="status",
            )


def _model_status(e: ModelEntry, s: ServedModel | None) -> pb.ModelStatus:
    lm, spec = e.loaded, e.spec
    state, error, error_class = _STATES[e.state], e.error, e.error_class
    if s is not None and s.batcher.device_lost:
        state, error, error_class = pb.ModelStatus.FAILED, s.batcher.device_lost, "device"
    elif s is not None and s.batcher.failure:
        state, error, error_class = pb.ModelStatus.FAILED, s.batcher.failure, "worker"
    status = pb.ModelStatus(
        name=spec.name,
        state=state,
        error=error,
        error_class=error_class,
        task=spec.task,
        device=str(lm.device) if lm else spec.device,
        dtype=str(lm.dtype).removeprefix("torch.") if lm else spec.dtype,
        source=spec.source,
        revision=lm.revision if lm else (spec.revision or ""),
        fingerprint=lm.fingerprint if lm else "",
        weight_bytes=lm.weight_bytes if lm else 0,
        load_seconds=e.stage_seconds,
        max_length=s.compute.max_length if s else spec.max_length,
        output_dims=lm.output_dims if lm else 0,
        load_failures=e.failures,
        next_retry_unix=e.next_retry or 0.0,
        pending_update=describe_update(spec, e.update) if e.update else "",
    )
    recipe = s.compute.recipe if s else lm.recipe if lm else None
    if recipe is not None and spec.task == "embedding":
        status.pooling = "+".join(recipe.pooling)
        status.normalize = recipe.normalize
        status.prompt_names.extend(sorted(recipe.prompts))
        status.default_prompt_name = recipe.default_prompt_name
    return status
