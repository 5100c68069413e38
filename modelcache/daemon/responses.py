"""Domain results -> protobuf responses: embeddings, log-prob statistics, model statuses.

Why apart from the servicer: pure builders (tested without a server), and the one place
that fixes the wire encoding of arrays — little-endian float32/int32 bytes, one blob per
statistic, so a client decodes a sequence with one ``np.frombuffer`` per field.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from modelcache.daemon.admission import ServedModel
from modelcache.daemon.changes import describe_update
from modelcache.daemon.inference import EmbedItem
from modelcache.daemon.loader import LoadedModel
from modelcache.daemon.logstats import SequenceStats
from modelcache.daemon.registry import ModelEntry, ModelState
from modelcache.daemon.rpcstatus import clip
from modelcache.v1 import modelcache_pb2 as pb

log = logging.getLogger(__name__)

_STATES = {
    ModelState.PENDING: pb.ModelStatus.PENDING,
    ModelState.LOADING: pb.ModelStatus.LOADING,
    ModelState.READY: pb.ModelStatus.READY,
    ModelState.FAILED: pb.ModelStatus.FAILED,
}


def embed_response(
    model: str, items: Sequence[EmbedItem], rows: Sequence[Any], lm: LoadedModel
) -> pb.EmbedResponse:
    matrix = np.stack(rows).astype("<f4", copy=False)
    return pb.EmbedResponse(
        model=model,
        embeddings=matrix.tobytes(),
        rows=matrix.shape[0],
        dims=matrix.shape[1],
        token_counts=[len(i.ids) for i in items],
        revision=lm.revision,
        fingerprint=lm.fingerprint,
    )


def _blob(a: np.ndarray[Any, Any] | None, dtype: str) -> bytes:
    return b"" if a is None else np.ascontiguousarray(a, dtype=dtype).tobytes()


def logprobs_response(
    model: str, top_k: int, stats: Sequence[SequenceStats], lm: LoadedModel
) -> pb.LogProbsResponse:
    seqs = [
        pb.SequenceLogProbs(
            token_ids=_blob(s.token_ids, "<i4"),
            logprobs=_blob(s.logprobs, "<f4"),
            entropy=_blob(s.entropy, "<f4"),
            expected_logprob=_blob(s.expected_logprob, "<f4"),
            logprob_variance=_blob(s.logprob_variance, "<f4"),
            rank=_blob(s.rank, "<i4"),
            top_k_ids=_blob(s.top_k_ids, "<i4"),
            top_k_logprobs=_blob(s.top_k_logprobs, "<f4"),
            num_tokens=len(s.token_ids),
        )
        for s in stats
    ]
    return pb.LogProbsResponse(
        model=model, sequences=seqs, top_k=top_k, revision=lm.revision, fingerprint=lm.fingerprint
    )


def reported_status(e: ModelEntry, s: ServedModel | None) -> pb.ModelStatus:
    """One model's ListModels entry, built defensively: a value protobuf refuses (out of
    range, a string that is not UTF-8) is reported in that model's entry instead of failing
    ListModels for every model, and with it the operator's status probe. Serialized here
    once, because gRPC serializes only after the handler returned."""
    try:
        status = model_status(e, s)
        status.SerializeToString()
        return status
    except Exception as exc:
        log.warning("ListModels: the status of model %s cannot be reported: %r", e.spec.name, exc)
        why = f"{type(exc).__name__}: {exc}".encode("utf-8", "backslashreplace").decode()
        return pb.ModelStatus(
            name=e.spec.name,
            state=_STATES[e.state],
            task=e.spec.task,
            error=clip(f"this model's status cannot be reported: {why}"),
            error_class="status",
        )


def model_status(e: ModelEntry, s: ServedModel | None) -> pb.ModelStatus:
    """The registry's view of a model, overridden by its batcher's when that failed."""
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
