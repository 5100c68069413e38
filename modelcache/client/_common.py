"""What the sync and asyncio clients share: target, channel options, retries, and the
conversion between numpy arrays and the wire's packed little-endian bytes.

Targets without a scheme become ``dns:///host:port`` with the ``round_robin`` policy: in
Kubernetes a headless Service name resolves to every daemon pod, and each call goes to the
next ready one, instead of gRPC's default ``pick_first`` pinning a client to one pod.

Retries: only UNAVAILABLE (model loading, pod starting or stopping), RESOURCE_EXHAUSTED
(queue full) and a CANCELLED the server sent are retried, with exponential backoff and full
jitter, inside the call's overall deadline. A gRPC server that stops aborts with CANCELLED the
calls it accepted but did not finish (seen on the local node: one call in a rolling update
of two replicas); every modelcache call is a pure read, so a retry is safe. A CANCELLED of
the client's own making (its channel closed) is final. Every other status is final: retrying
a bad input, a wrong task or a failed model cannot succeed and would only add load.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2_grpc

from modelcache.v1 import modelcache_pb2 as pb
from modelcache.v1 import modelcache_pb2_grpc as pb_grpc

SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")
_STATES = {
    pb.ModelStatus.PENDING: "pending",
    pb.ModelStatus.LOADING: "loading",
    pb.ModelStatus.READY: "ready",
    pb.ModelStatus.FAILED: "failed",
}

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]


def normalize_target(target: str) -> str:
    """``host:port`` -> ``dns:///host:port``; targets with a scheme are kept as given."""
    return target if target.startswith(_SCHEMES) else f"dns:///{target}"


def channel_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, extra: Sequence[tuple[str, Any]] = ()
) -> list[tuple[str, Any]]:
    return [
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 0),  # retries are ours, with our policy
        *extra,
    ]


def channel_credentials(
    root_certificates: bytes | None,
    private_key: bytes | None,
    certificate_chain: bytes | None,
    tls: bool,
) -> grpc.ChannelCredentials | None:
    if not (tls or root_certificates or private_key or certificate_chain):
        return None
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


class ModelCacheError(Exception):
    """An RPC that failed for good: ``code`` is the gRPC status, ``details`` its message."""

    def __init__(self, code: grpc.StatusCode, details: str, attempts: int = 1) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.attempts = code, details, attempts


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    #: called before each retry with (attempt number, status, delay in seconds)
    on_retry: Callable[[int, grpc.StatusCode, float], None] | None = None

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max_backoff, initial * multiplier**retry)]."""
        return rng.uniform(
            0.0, min(self.max_backoff, self.initial_backoff * self.multiplier**retry)
        )


@dataclass
class Attempts:
    """The retry loop's bookkeeping, shared by both clients."""

    policy: RetryPolicy
    deadline: float | None  # time.monotonic()
    rng: random.Random
    count: int = 0

    def remaining(self, now: float) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - now
        if left <= 0:
            raise ModelCacheError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "deadline exceeded before the call could be (re)tried",
                self.count,
            )
        return left

    def delay_after(self, exc: grpc.RpcError, now: float) -> float:
        """Seconds to wait before the next attempt, or raise the final error."""
        self.count += 1
        code, details = exc.code(), exc.details() or ""
        retryable = code in RETRYABLE or (
            code == grpc.StatusCode.CANCELLED and "Channel closed" not in details
        )
        if not retryable or self.count >= self.policy.max_attempts:
            raise ModelCacheError(code, details, self.count) from None
        delay = self.policy.backoff(self.count - 1, self.rng)
        if self.deadline is not None and now + delay >= self.deadline:
            raise ModelCacheError(code, details, self.count) from None
        if self.policy.on_retry is not None:
            self.policy.on_retry(self.count, code, delay)
        return delay


# -- results -----------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbedResult:
    embeddings: F32  # (rows, dims) float32
    token_counts: npt.NDArray[np.uint32]
    model: str
    revision: str
    fingerprint: str


@dataclass(frozen=True)
class SequenceLogProbs:
    """One sequence of n tokens; per-position arrays have n-1 entries (position i is the
    log-prob of token i given tokens < i). Statistics not requested are None."""

    token_ids: I32
    logprobs: F32
    entropy: F32 | None = None
    expected_logprob: F32 | None = None
    logprob_variance: F32 | None = None
    rank: I32 | None = None
    top_k_ids: I32 | None = None  # (n-1, k)
    top_k_logprobs: F32 | None = None  # (n-1, k)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    state: str  # pending | loading | ready | failed
    error: str
    error_class: str
    task: str
    device: str
    dtype: str
    source: str
    revision: str
    fingerprint: str
    weight_bytes: int
    load_seconds: dict[str, float]
    max_length: int
    output_dims: int
    #: Embedding models: pooling served, default normalization, prompt names.
    pooling: str = ""
    normalize: bool = False
    prompt_names: tuple[str, ...] = ()
    default_prompt_name: str = ""


@dataclass(frozen=True)
class ModelList:
    models: list[ModelInfo]
    versions: dict[str, str] = field(default_factory=dict)


# -- requests and decoding -----------------------------------------------------------------
def _texts(inputs: str | Sequence[str]) -> list[str]:
    return [inputs] if isinstance(inputs, str) else list(inputs)


def _token_ids(seqs: Sequence[Sequence[int]] | None) -> list[pb.TokenIds]:
    return [pb.TokenIds(ids=[int(i) for i in seq]) for seq in seqs or []]


def embed_request(
    model: str,
    inputs: str | Sequence[str] | None,
    normalize: bool | None,
    truncate: bool,
    prompt_name: str = "",
    token_ids: Sequence[Sequence[int]] | None = None,
) -> pb.EmbedRequest:
    req = pb.EmbedRequest(
        model=model,
        inputs=_texts(inputs) if inputs is not None else [],
        truncate=truncate,
        prompt_name=prompt_name,
        token_ids=_token_ids(token_ids),
    )
    if normalize is not None:
        req.normalize = normalize
    return req


def logprobs_request(
    model: str,
    inputs: str | Sequence[str] | None,
    token_ids: Sequence[Sequence[int]] | None,
    top_k: int,
    entropy: bool,
    expected_logprob: bool,
    rank: bool,
    truncate: bool,
) -> pb.LogProbsRequest:
    return pb.LogProbsRequest(
        model=model,
        inputs=_texts(inputs) if inputs is not None else [],
        token_ids=_token_ids(token_ids),
        top_k=top_k,
        truncate=truncate,
        entropy=entropy,
        expected_logprob=expected_logprob,
        rank=rank,
    )


def _array(blob: bytes, dtype: str, count: int, what: str) -> Any:
    arr = np.frombuffer(blob, dtype=dtype)
    if arr.size != count:
        raise ValueError(f"malformed response: {what} has {arr.size} values, expected {count}")
    return arr.astype(dtype[1:], copy=True)  # native order, writable


def decode_embed(resp: pb.EmbedResponse) -> EmbedResult:
    rows, dims = resp.rows, resp.dims
    emb = _array(resp.embeddings, "<f4", rows * dims, "embeddings").reshape(rows, dims)
    return EmbedResult(
        embeddings=emb,
        token_counts=np.asarray(resp.token_counts, np.uint32),
        model=resp.model,
        revision=resp.revision,
        fingerprint=resp.fingerprint,
    )


def decode_logprobs(resp: pb.LogProbsResponse, req: pb.LogProbsRequest) -> list[SequenceLogProbs]:
    out = []
    k = resp.top_k
    for s in resp.sequences:
        n = s.num_tokens
        m = max(n - 1, 0)

        def opt(blob: bytes, dtype: str, on: bool, what: str, m: int = m) -> Any:
            return _array(blob, dtype, m, what) if on else None

        out.append(
            SequenceLogProbs(
                token_ids=_array(s.token_ids, "<i4", n, "token_ids"),
                logprobs=_array(s.logprobs, "<f4", m, "logprobs"),
                entropy=opt(s.entropy, "<f4", req.entropy, "entropy"),
                expected_logprob=opt(
                    s.expected_logprob, "<f4", req.expected_logprob, "expected_logprob"
                ),
                logprob_variance=opt(
                    s.logprob_variance, "<f4", req.expected_logprob, "logprob_variance"
                ),
                rank=opt(s.rank, "<i4", req.rank, "rank"),
                top_k_ids=_array(s.top_k_ids, "<i4", m * k, "top_k_ids").reshape(m, k)
                if k
                else None,
                top_k_logprobs=(
                    _array(s.top_k_logprobs, "<f4", m * k, "top_k_logprobs").reshape(m, k)
                    if k
                    else None
                ),
            )
        )
    return out


def decode_models(resp: pb.ListModelsResponse) -> ModelList:
    return ModelList(
        models=[
            ModelInfo(
                name=m.name,
                state=_STATES.get(m.state, "unspecified"),
                error=m.error,
                error_class=m.error_class,
                task=m.task,
                device=m.device,
                dtype=m.dtype,
                source=m.source,
                revision=m.revision,
                fingerprint=m.fingerprint,
                weight_bytes=m.weight_bytes,
                load_seconds=dict(m.load_seconds),
                max_length=m.max_length,
                output_dims=m.output_dims,
                pooling=m.pooling,
                normalize=m.normalize,
                prompt_names=tuple(m.prompt_names),
                default_prompt_name=m.default_prompt_name,
            )
            for m in resp.models
        ],
        versions=dict(resp.versions),
    )


class ClientBase:
    """What the blocking and the asyncio client share: settings, channel, stubs, retry
    budget. Subclasses say only how a channel is made (``_secure`` / ``_insecure``)."""

    _secure: Callable[..., Any]
    _insecure: Callable[..., Any]

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float | None = 30.0,
        retry: RetryPolicy | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
        seed: int | None = None,
    ) -> None:
        self.target = normalize_target(target)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._rng = random.Random(seed)
        opts = channel_options(max_message_bytes, options)
        creds = channel_credentials(root_certificates, private_key, certificate_chain, tls)
        cls = type(self)
        self.channel: Any = (
            cls._secure(self.target, creds, opts) if creds else cls._insecure(self.target, opts)
        )
        self._stub = pb_grpc.ModelCacheStub(self.channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def _attempts(self, timeout: float | None) -> Attempts:
        """The retry state of one call; ``timeout`` is the overall deadline (None: none)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return Attempts(self.retry, deadline, self._rng)
