"""Clients for the modelcache daemon: blocking (``ModelCacheClient``) and asyncio
(``AsyncModelCacheClient``). Both return numpy arrays, apply a deadline to every call,
retry only UNAVAILABLE and RESOURCE_EXHAUSTED (exponential backoff, full jitter), and
balance calls round-robin over every address a ``dns:///`` target resolves to."""

from modelcache.client._common import (
    EmbedResult,
    ModelCacheError,
    ModelInfo,
    ModelList,
    RetryPolicy,
    SequenceLogProbs,
)
from modelcache.client.aio import AsyncModelCacheClient
from modelcache.client.sync import ModelCacheClient

__all__ = [
    "AsyncModelCacheClient",
    "EmbedResult",
    "ModelCacheClient",
    "ModelCacheError",
    "ModelInfo",
    "ModelList",
    "RetryPolicy",
    "SequenceLogProbs",
]
