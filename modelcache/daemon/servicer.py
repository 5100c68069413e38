"""The ModelCache gRPC service: protobuf <-> domain types, one precise status per failure.

The servicer only translates: a request's bytes are parsed, admitted (admission: pure
checks, each failure a status from the contract in rpcstatus), turned into batch items,
handed to the model's batcher, and the results built into a response (responses).

Requests arrive as raw bytes (the handlers are registered without a deserializer) so a
message that does not parse is INVALID_ARGUMENT naming the type, not gRPC's generic error.
Tokenization and token-id checks run on the executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc import StatusCode as Code

from modelcache.config import BatchingConfig
from modelcache.daemon import admission
from modelcache.daemon import batcher as b
from modelcache.daemon.admission import ServedModel
from modelcache.daemon.inference import (
    MAX_TOP_K,
    EmbedItem,
    InputError,
    LogProbsItem,
    LogProbsOptions,
)
from modelcache.daemon.loader import versions
from modelcache.daemon.registry import ModelEntry, ModelRegistry
from modelcache.daemon.responses import embed_response, logprobs_response, reported_status
from modelcache.daemon.rpcstatus import RpcCall, ServingError, batch_error, clip
from modelcache.v1 import modelcache_pb2 as pb

__all__ = ["SERVICE", "ModelCacheServicer"]

log = logging.getLogger(__name__)
SERVICE = "modelcache.v1.ModelCache"
M = TypeVar("M", bound=Message)


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
        impl: Callable[[M, RpcCall], Awaitable[Message]],
    ) -> Message:
        call = RpcCall(started=time.perf_counter())
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

    # -- shared checks (admission) ---------------------------------------------------
    def _entry(self, name: str, task: str, method: str, call: RpcCall) -> ModelEntry:
        entry = admission.find_entry(self.registry, name)
        call.model = name  # configured: a metric label from here on
        admission.check_task(entry, task, method)
        return entry

    def _ready(self, entry: ModelEntry, n: int) -> ServedModel:
        return admission.check_ready(entry, self.served().get(entry.spec.name), n)

    async def _compute(
        self, served: ServedModel, prepare: Callable[[], list[Any]], call: RpcCall
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
            raise batch_error(exc) from None
        try:
            return items, await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            batcher.cancel(job)
            raise
        except b.BatchError as exc:
            raise batch_error(exc) from None

    # -- Embed -----------------------------------------------------------------------
    async def _embed(self, req: pb.EmbedRequest, call: RpcCall) -> pb.EmbedResponse:
        entry = self._entry(req.model, "embedding", "Embed", call)
        if not req.inputs and not req.token_ids:
            raise ServingError(Code.INVALID_ARGUMENT, "inputs is empty")
        count = admission.count_sequences(req, self.cfg)
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
        return embed_response(req.model, items, rows, compute.loaded)

    # -- LogProbs --------------------------------------------------------------------
    async def _logprobs(self, req: pb.LogProbsRequest, call: RpcCall) -> pb.LogProbsResponse:
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
        count = admission.count_sequences(req, self.cfg)
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
        return logprobs_response(req.model, req.top_k, stats, compute.loaded)

    # -- ListModels ------------------------------------------------------------------
    async def _list(self, req: pb.ListModelsRequest, call: RpcCall) -> pb.ListModelsResponse:
        served = self.served()
        models = [reported_status(e, served.get(e.spec.name)) for e in self.registry.entries()]
        return pb.ListModelsResponse(
            models=models, versions=versions(), config_hash=self.config_hash()
        )
