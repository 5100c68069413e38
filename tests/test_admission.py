"""The servicer's pure core without a server: admission checks and protobuf builders
(the same rules are exercised over gRPC in test_serving; these pin each rule alone)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from grpc import StatusCode as Code

from modelcache.config import BatchingConfig, ModelSpec, parse_config
from modelcache.daemon import admission
from modelcache.daemon.logstats import SequenceStats
from modelcache.daemon.registry import ModelEntry, ModelRegistry, ModelState
from modelcache.daemon.responses import logprobs_response, reported_status
from modelcache.daemon.rpcstatus import ServingError
from modelcache.v1 import modelcache_pb2 as pb

CFG = BatchingConfig(max_inputs_per_request=3, max_input_chars=10)


def _spec(task: str = "embedding") -> ModelSpec:
    return parse_config({"models": [{"name": "m", "source": "/nowhere", "task": task}]}).models[0]


def _code(fn: Any, *args: Any) -> tuple[Code, str]:
    with pytest.raises(ServingError) as err:
        fn(*args)
    return err.value.code, err.value.message


def test_unknown_and_missing_model_names() -> None:
    registry = ModelRegistry(parse_config({"models": [_spec().model_dump()]}))
    assert admission.find_entry(registry, "m").spec.name == "m"
    assert _code(admission.find_entry, registry, "")[0] is Code.INVALID_ARGUMENT
    code, message = _code(admission.find_entry, registry, "x" * 5000)
    assert code is Code.NOT_FOUND and "5000 chars" in message and len(message) < 300
    assert "configured: m" in message


def test_wrong_task_names_the_rpc_that_fits() -> None:
    entry = ModelEntry(_spec("causal-lm"), ModelState.READY)
    code, message = _code(admission.check_task, entry, "embedding", "Embed")
    assert code is Code.FAILED_PRECONDITION and "use LogProbs" in message
    assert "an embedding model" in message
    admission.check_task(entry, "causal-lm", "LogProbs")


@pytest.mark.parametrize(
    ("inputs", "ids", "fragment"),
    [
        (["a"], [[1]], "(both is)"),
        (["a", "b", "c", "d"], [], "4 inputs; at most 3"),
        (["a", ""], [], "inputs[1] is empty"),
        (["a" * 11], [], "inputs[0] has 11 characters; at most 10"),
        ([], [[1]] * 4, "4 token_ids; at most 3"),
    ],
)
def test_request_shape_is_refused_naming_the_input(
    inputs: list[str], ids: list[list[int]], fragment: str
) -> None:
    req = pb.EmbedRequest(model="m", inputs=inputs, token_ids=[pb.TokenIds(ids=i) for i in ids])
    code, message = _code(admission.count_sequences, req, CFG)
    assert code is Code.INVALID_ARGUMENT and fragment in message


def test_counts_sequences() -> None:
    assert admission.count_sequences(pb.EmbedRequest(inputs=["a", "b"]), CFG) == 2
    req = pb.LogProbsRequest(token_ids=[pb.TokenIds(ids=[1, 2])])
    assert admission.count_sequences(req, CFG) == 1


class _Batcher:
    def __init__(self, room: bool = True, failure: str = "", lost: str = "") -> None:
        self.room, self.failure, self.device_lost = room, failure, lost

    def has_room(self, n: int) -> bool:
        return self.room


def _served(**kw: Any) -> Any:
    return SimpleNamespace(compute=None, batcher=_Batcher(**kw))


def test_readiness_statuses() -> None:
    spec = _spec()
    failed = ModelEntry(spec, ModelState.FAILED, error="no weights", error_class="missing_files")
    code, message = _code(admission.check_ready, failed, None, 1)
    assert code is Code.FAILED_PRECONDITION and "(missing_files): no weights" in message
    loading = ModelEntry(spec, ModelState.LOADING)
    assert _code(admission.check_ready, loading, None, 1)[0] is Code.UNAVAILABLE
    ready = ModelEntry(spec, ModelState.READY)
    lost = _served(lost="device lost: illegal memory access")
    assert _code(admission.check_ready, ready, lost, 1) == (
        Code.UNAVAILABLE,
        "device lost: illegal memory access",
    )
    assert _code(admission.check_ready, ready, _served(failure="x"), 1)[0] is (
        Code.FAILED_PRECONDITION
    )
    assert _code(admission.check_ready, ready, _served(room=False), 1)[0] is (
        Code.RESOURCE_EXHAUSTED
    )
    ok = _served()
    assert admission.check_ready(ready, ok, 1) is ok


def test_logprobs_arrays_travel_as_little_endian_blobs() -> None:
    stats = SequenceStats(
        token_ids=np.array([5, 6, 7], dtype=np.int64),
        logprobs=np.array([-1.5, -0.25], dtype=np.float64),
        top_k_ids=np.array([[1, 2], [3, 4]], dtype=np.int64),
        top_k_logprobs=np.array([[-0.1, -0.2], [-0.3, -0.4]], dtype=np.float32),
    )
    lm = SimpleNamespace(revision="r", fingerprint="f")
    resp = logprobs_response("m", 2, [stats], lm)  # type: ignore[arg-type]
    (seq,) = resp.sequences
    assert seq.num_tokens == 3 and resp.top_k == 2 and resp.revision == "r"
    assert np.frombuffer(seq.token_ids, "<i4").tolist() == [5, 6, 7]
    assert np.frombuffer(seq.logprobs, "<f4").tolist() == [-1.5, -0.25]
    assert np.frombuffer(seq.top_k_ids, "<i4").reshape(2, 2).tolist() == [[1, 2], [3, 4]]
    assert seq.entropy == b"" and seq.rank == b""  # not asked: absent, not zeros


def test_a_status_protobuf_refuses_is_reported_in_that_model_only() -> None:
    # A lone surrogate cannot be encoded as UTF-8: protobuf refuses the string.
    entry = ModelEntry(_spec(), ModelState.FAILED, error="bad \udcff bytes", error_class="x")
    status = reported_status(entry, None)
    assert status.name == "m" and status.state == pb.ModelStatus.FAILED
    assert status.error_class == "status" and "cannot be reported" in status.error
    fine = reported_status(ModelEntry(_spec(), ModelState.PENDING), None)
    assert fine.state == pb.ModelStatus.PENDING and fine.error_class == ""
