"""Blocking client for the modelcache daemon; results are numpy arrays.

    with ModelCacheClient("127.0.0.1:50051") as client:
        vectors = client.embed("minilm", ["a sentence", "another one"])  # (2, 384) float32

Each method takes ``timeout`` (seconds, the overall deadline across retries; default the
client's). The client is thread-safe: share one per process (one channel, many calls).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

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

R = TypeVar("R")
_UNSET: Any = object()


class ModelCacheClient(ClientBase):
    _secure = staticmethod(grpc.secure_channel)
    _insecure = staticmethod(grpc.insecure_channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ModelCacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., R], request: Any, timeout: float | None) -> R:
        attempts = self._attempts(self.timeout if timeout is _UNSET else timeout)
        while True:
            left = attempts.remaining(time.monotonic())
            try:
                return method(request, timeout=left)
            except grpc.RpcError as exc:
                time.sleep(attempts.delay_after(exc, time.monotonic()))

    def embed(
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
        result = self.embed_result(
            model,
            inputs,
            token_ids=token_ids,
            prompt_name=prompt_name,
            normalize=normalize,
            truncate=truncate,
            timeout=timeout,
        )
        return result.embeddings

    def embed_result(
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
        return decode_embed(self._call(self._stub.Embed, req, timeout))

    def logprobs(
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
        """Per-token log-probs (and the requested statistics) for each sequence."""
        req = logprobs_request(
            model, inputs, token_ids, top_k, entropy, expected_logprob, rank, truncate
        )
        return decode_logprobs(self._call(self._stub.LogProbs, req, timeout), req)

    def list_models(self, *, timeout: float | None = _UNSET) -> ModelList:
        return decode_models(self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout))

    def health(self, service: str = "", *, timeout: float | None = _UNSET) -> str:
        """SERVING, NOT_SERVING or SERVICE_UNKNOWN for "" (every model) or a model name."""
        resp = self._call(
            self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def wait_until_serving(self, service: str = "", *, timeout: float = 120.0) -> None:
        """Block until the service is SERVING (waits for the server to come up, too)."""
        stream = self._health.Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=True
        )
        try:
            for resp in stream:
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as exc:
            raise ModelCacheError(exc.code(), exc.details() or "") from None
        finally:
            stream.cancel()
        raise ModelCacheError(grpc.StatusCode.UNAVAILABLE, "health stream ended")
