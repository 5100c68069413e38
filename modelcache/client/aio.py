"""asyncio client for the modelcache daemon; the same API as the blocking client.

    async with AsyncModelCacheClient("127.0.0.1:50051") as client:
        vectors = await client.embed("minilm", ["a sentence"])  # (1, 384) float32

Create it inside the event loop that uses it (a grpc.aio channel belongs to one loop).
Cancelling the awaiting task cancels the RPC, and the daemon drops the request from its
queue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from modelcache.client._common import (
    F32,
    ClientBase,
    EmbedResult,
    ModelCacheError,
    ModelList,
    SequenceLogProbs,
    decode_embed,
    decode_logprobs,
    decode_models,
    embed_request,
    logprobs_request,
)
from modelcache.v1 import modelcache_pb2 as pb

_UNSET: Any = object()


class AsyncModelCacheClient(ClientBase):
    _secure = staticmethod(grpc.aio.secure_channel)
    _insecure = staticmethod(grpc.aio.insecure_channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncModelCacheClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        attempts = self._attempts(self.timeout if timeout is _UNSET else timeout)
        while True:
            left = attempts.remaining(time.monotonic())
            try:
                return await method(request, timeout=left)
            except grpc.RpcError as exc:
                await asyncio.sleep(attempts.delay_after(exc, time.monotonic()))

    async def embed(
        self,
        model: str,
        inputs: str | Sequence[str] | None = None,
        *,
        token_ids: Sequence[Sequence[int]] | None = None,
        prompt_name: str = "",
        normalize: bool | None = None,
        truncate: bool = True,
        timeout: float | None = _UNSET,
    ) -> F32:
        """Embeddings as a (len(inputs), dims) float32 array, in input order.

        ``prompt_name`` picks one of the model's named prompts (``list_models`` shows
        them; "" is the model's default prompt); ``token_ids`` sends pre-tokenized
        sequences instead of ``inputs``, used as given."""
        result = await self.embed_result(
            model,
            inputs,
            token_ids=token_ids,
            prompt_name=prompt_name,
            normalize=normalize,
            truncate=truncate,
            timeout=timeout,
        )
        return result.embeddings

    async def embed_result(
        self,
        model: str,
        inputs: str | Sequence[str] | None = None,
        *,
        token_ids: Sequence[Sequence[int]] | None = None,
        prompt_name: str = "",
        normalize: bool | None = None,
        truncate: bool = True,
        timeout: float | None = _UNSET,
    ) -> EmbedResult:
        """Embeddings plus token counts, revision and fingerprint of the model."""
        req = embed_request(model, inputs, normalize, truncate, prompt_name, token_ids)
        return decode_embed(await self._call(self._stub.Embed, req, timeout))

    async def logprobs(
        self,
        model: str,
        inputs: str | Sequence[str] | None = None,
        *,
        token_ids: Sequence[Sequence[int]] | None = None,
        top_k: int = 0,
        entropy: bool = False,
        expected_logprob: bool = False,
        rank: bool = False,
        truncate: bool = True,
        timeout: float | None = _UNSET,
    ) -> list[SequenceLogProbs]:
        req = logprobs_request(
            model, inputs, token_ids, top_k, entropy, expected_logprob, rank, truncate
        )
        return decode_logprobs(await self._call(self._stub.LogProbs, req, timeout), req)

    async def list_models(self, *, timeout: float | None = _UNSET) -> ModelList:
        return decode_models(
            await self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        )

    async def health(self, service: str = "", *, timeout: float | None = _UNSET) -> str:
        resp = await self._call(
            self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    async def wait_until_serving(self, service: str = "", *, timeout: float = 120.0) -> None:
        """Wait until the service is SERVING (waits for the server to come up, too)."""
        call = self._health.Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=True
        )
        try:
            async for resp in call:
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as exc:
            raise ModelCacheError(exc.code(), exc.details() or "") from None
        finally:
            call.cancel()
        raise ModelCacheError(grpc.StatusCode.UNAVAILABLE, "health stream ended")
