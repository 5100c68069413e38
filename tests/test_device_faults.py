"""Device failures through the real server, injected on a CPU (issue 12): a batch that runs
out of memory is split and still answered exactly; a sequence that does not fit alone is
RESOURCE_EXHAUSTED naming its tokens; a context-poisoning CUDA error turns the model
NOT_SERVING and stops the daemon, which exits non-zero through its graceful path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelcache.config import parse_config
from modelcache.daemon.registry import ModelRegistry
from modelcache.daemon.server import EXIT_DEVICE_LOST
from modelcache.v1 import modelcache_pb2 as pb
from modelcache.v1 import modelcache_pb2_grpc as pb_grpc

pytest.register_assert_rewrite("daemon_process", "serving_fixtures")
from daemon_process import ServeProcess  # noqa: E402
from serving_fixtures import RunningDaemon, metric, model, wait_for  # noqa: E402

pytest_plugins = ("serving_fixtures",)
Code = grpc.StatusCode
POISON = 7777
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
INJECT = Path(__file__).resolve().parent / "inject"


class Capacity:
    """An input-embedding pre-hook: more than ``tokens`` ids in one pass is a CUDA OOM,
    the poison id a device-side assert."""

    def __init__(self, module: torch.nn.Module, tokens: int) -> None:
        self.tokens = tokens
        self.passes: list[int] = []
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any) -> None:
        ids = args[0]
        self.passes.append(ids.numel())
        if bool((ids == POISON).any()):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if ids.numel() > self.tokens:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {ids.numel()}")


@pytest.fixture
def served(tiny_lms: dict[str, Path]) -> Iterator[tuple[RunningDaemon, Capacity]]:
    config = parse_config(
        {
            "models": [model("lm", tiny_lms["llama"], "causal-lm")],
            "batching": {"max_wait_ms": 200},
        }
    )
    registry = ModelRegistry(config)
    registry.prepare()
    registry.load_all()
    loaded = registry.entry("lm").loaded
    assert loaded is not None
    daemon = RunningDaemon(config, registry)
    wait_for(lambda: "lm" in daemon.server.servicer.served(), "lm served")
    capacity = Capacity(loaded.model.get_input_embeddings(), tokens=1 << 30)
    yield daemon, capacity
    capacity.handle.remove()
    daemon.stop()
    registry.close()


def logprobs(stub: Any, seqs: list[list[int]]) -> pb.LogProbsResponse:
    req = pb.LogProbsRequest(
        model="lm", token_ids=[pb.TokenIds(ids=s) for s in seqs], entropy=True, top_k=3
    )
    return stub.LogProbs(req, timeout=60)


def test_an_oom_batch_is_split_and_answered_exactly(
    served: tuple[RunningDaemon, Capacity],
) -> None:
    daemon, capacity = served
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1000, 5000, n).tolist() for n in (9, 11, 12, 12, 14, 15)]
    with grpc.insecure_channel(daemon.address) as channel:
        stub = pb_grpc.ModelCacheStub(channel)  # type: ignore[no-untyped-call]
        want = logprobs(stub, seqs)
        splits = metric("modelcache_batch_oom_total", model="lm", outcome="split")
        capacity.tokens, capacity.passes = 40, []
        got = logprobs(stub, seqs)
        assert metric("modelcache_batch_oom_total", model="lm", outcome="split") > splits
        assert capacity.passes[0] > 40 and sum(p <= 40 for p in capacity.passes) >= 2
        for a, b in zip(want.sequences, got.sequences, strict=True):
            np.testing.assert_allclose(
                np.frombuffer(a.logprobs, "<f4"), np.frombuffer(b.logprobs, "<f4"), atol=1e-5
            )
            assert a.top_k_ids == b.top_k_ids or np.allclose(
                np.frombuffer(a.top_k_logprobs, "<f4"), np.frombuffer(b.top_k_logprobs, "<f4")
            )
        with pytest.raises(grpc.RpcError) as err:
            logprobs(stub, [seqs[0], rng.integers(1000, 5000, 50).tolist()])
        assert err.value.code() == Code.RESOURCE_EXHAUSTED
        assert "sequence 1 of the request has 50 tokens" in (err.value.details() or "")
        capacity.tokens = 1 << 30  # memory is back: the same request is answered
        assert len(logprobs(stub, [rng.integers(1000, 5000, 50).tolist()]).sequences) == 1


def test_a_poisoned_device_stops_the_daemon(served: tuple[RunningDaemon, Capacity]) -> None:
    daemon, _ = served
    with grpc.insecure_channel(daemon.address) as channel:
        stub = pb_grpc.ModelCacheStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as err:
            logprobs(stub, [[101, POISON, 102]])
        assert err.value.code() == Code.UNAVAILABLE
        assert "illegal memory access" in (err.value.details() or "")
        health = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
        check = health_pb2.HealthCheckRequest(service="lm")
        assert health.Check(check).status == NOT_SERVING
        with pytest.raises(grpc.RpcError) as again:
            logprobs(stub, [[101, 102, 103]])
        assert again.value.code() == Code.UNAVAILABLE
    wait_for(daemon.server.stop_requested.is_set, "the daemon asked to stop")
    assert daemon.server.exit_code == EXIT_DEVICE_LOST


@pytest.mark.slow
def test_the_daemon_process_exits_non_zero_after_a_device_failure(
    tmp_path: Path, tiny_lms: dict[str, Path]
) -> None:
    config = {"models": [model("lm", tiny_lms["gpt2"], "causal-lm")]}
    env = {"PYTHONPATH": str(INJECT), "MODELCACHE_TEST_POISON_ID": str(POISON)}
    with ServeProcess(config, tmp_path, env=env) as daemon:
        assert daemon.wait_settled().models[0].state == pb.ModelStatus.READY
        with grpc.insecure_channel(daemon.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
            check = health_pb2.HealthCheckRequest(service="lm")
            wait_for(
                lambda: health.Check(check).status == health_pb2.HealthCheckResponse.SERVING,
                "lm serving",
            )
            stub = pb_grpc.ModelCacheStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError) as err:
                logprobs(stub, [[101, POISON, 102]])
            assert err.value.code() == Code.UNAVAILABLE
        assert daemon.proc is not None
        status = daemon.proc.wait(60)
    assert status == EXIT_DEVICE_LOST, daemon.log()[-3000:]
    log = daemon.log()
    assert "device-side assert" in log and "draining in-flight requests" in log
