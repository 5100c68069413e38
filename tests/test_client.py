"""The sync and asyncio clients against a real daemon: numpy results, deadlines, retries
only where they can help, cancellation, and the dns:/// round-robin target."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from modelcache.client import (
    AsyncModelCacheClient,
    ModelCacheClient,
    ModelCacheError,
    RetryPolicy,
)
from modelcache.client._common import SERVICE_CONFIG, normalize_target
from modelcache.config import parse_config
from modelcache.daemon.globalstate import LOAD_LOCK
from modelcache.daemon.registry import ModelRegistry, ModelState
from modelcache.settings import DaemonSettings

pytest.register_assert_rewrite("serving_fixtures")
from serving_fixtures import ForwardGate, RunningDaemon, metric, model, wait_for  # noqa: E402

pytest_plugins = ("serving_fixtures",)

Code = grpc.StatusCode


@pytest.fixture
def gate(session_registry: ModelRegistry) -> Any:
    loaded = session_registry.entry("gpt2").loaded
    assert loaded is not None
    g = ForwardGate(loaded.model)
    yield g
    g.close()


def test_targets_and_service_config() -> None:
    assert normalize_target("127.0.0.1:50051") == "dns:///127.0.0.1:50051"
    assert normalize_target("modelcache.ns.svc:50051") == "dns:///modelcache.ns.svc:50051"
    for kept in ("dns:///a:1", "ipv4:127.0.0.1:1", "unix:///tmp/s"):
        assert normalize_target(kept) == kept
    assert '"loadBalancingConfig": [{"round_robin": {}}]' in SERVICE_CONFIG


def test_backoff_is_exponential_with_full_jitter() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    rng = random.Random(0)
    for retry, cap in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        delays = [policy.backoff(retry, rng) for _ in range(300)]
        assert min(delays) >= 0 and max(delays) <= cap
        assert max(delays) > 0.9 * cap and min(delays) < 0.1 * cap  # spread over [0, cap]


def test_sync_client_returns_numpy(daemon: RunningDaemon) -> None:
    with ModelCacheClient(daemon.address) as c:  # dns:/// target, round_robin
        assert c.target == f"dns:///{daemon.address}"
        one = c.embed("minilm", "a single string is one input")
        assert one.shape == (1, 384) and one.dtype == np.float32 and one.flags.writeable
        res = c.embed_result("minilm", ["two", "inputs here"])
        assert res.token_counts.tolist() == [3, 4] and len(res.fingerprint) == 64
        seqs = c.logprobs("gpt2", ["hello there world"], top_k=3, rank=True)
        s = seqs[0]
        assert s.token_ids.dtype == np.int32 and s.logprobs.shape == (len(s.token_ids) - 1,)
        assert s.top_k_ids is not None and s.top_k_ids.shape == (len(s.token_ids) - 1, 3)
        assert s.rank is not None and s.entropy is None and s.expected_logprob is None
        assert c.health("minilm") == "SERVING"
        assert [m.name for m in c.list_models().models][:2] == ["minilm", "gpt2"]


def test_localhost_resolves_and_balances(daemon: RunningDaemon) -> None:
    """localhost resolves to ::1 and 127.0.0.1; round_robin uses whichever is up."""
    with ModelCacheClient(f"localhost:{daemon.port}", timeout=20) as c:
        for _ in range(5):
            assert c.embed("minilm", ["x"]).shape == (1, 384)


def test_async_client_matches_sync(daemon: RunningDaemon) -> None:
    texts = [f"sentence number {i} for the async client" for i in range(6)]
    with ModelCacheClient(daemon.address) as c:
        want = c.embed("minilm", texts)
        want_lp = c.logprobs("llama", texts, entropy=True)

    async def main() -> tuple[list[np.ndarray], Any, str]:
        async with AsyncModelCacheClient(daemon.address) as ac:
            rows = await asyncio.gather(*(ac.embed("minilm", [t]) for t in texts))
            lp = await ac.logprobs("llama", texts, entropy=True)
            return list(rows), lp, await ac.health()

    rows, lp, overall = asyncio.run(main())
    np.testing.assert_allclose(np.concatenate(rows), want, atol=1e-5)
    for got, exp in zip(lp, want_lp, strict=True):
        np.testing.assert_allclose(got.entropy, exp.entropy, atol=1e-4)
    assert overall == "NOT_SERVING"  # the session daemon has a broken model


def test_final_errors_are_not_retried(daemon: RunningDaemon) -> None:
    retries: list[Code] = []
    policy = RetryPolicy(on_retry=lambda n, code, delay: retries.append(code))
    with ModelCacheClient(daemon.address, retry=policy) as c:
        for call, code in (
            (lambda: c.embed("nope", ["x"]), Code.NOT_FOUND),
            (lambda: c.embed("minilm", [""]), Code.INVALID_ARGUMENT),
            (lambda: c.logprobs("broken", ["x"]), Code.FAILED_PRECONDITION),
        ):
            with pytest.raises(ModelCacheError) as info:
                call()
            assert info.value.code == code and info.value.attempts == 1
    assert retries == []


def test_unavailable_is_retried_until_the_model_is_loaded(tiny_lms: dict[str, Path]) -> None:
    config = parse_config({"models": [model("slow", tiny_lms["gpt2"], "causal-lm")]})
    registry = ModelRegistry(config)
    registry.prepare()
    loading = threading.Event()
    registry.add_listener(lambda n, s: loading.set() if s is ModelState.LOADING else None)
    retries: list[tuple[int, Code]] = []

    def on_retry(attempt: int, code: Code, delay: float) -> None:
        retries.append((attempt, code))
        if attempt == 2 and LOAD_LOCK._is_owned():  # type: ignore[attr-defined]
            LOAD_LOCK.release()  # the model may load now

    LOAD_LOCK.acquire()
    daemon = RunningDaemon(config, registry)
    try:
        registry.start_all()
        assert loading.wait(10)
        with ModelCacheClient(
            daemon.address,
            timeout=60,
            retry=RetryPolicy(
                max_attempts=50, initial_backoff=0.01, max_backoff=0.1, on_retry=on_retry
            ),
        ) as c:
            assert c.logprobs("slow", ["eventually"])[0].logprobs.size > 0
        assert retries[:2] == [(1, Code.UNAVAILABLE), (2, Code.UNAVAILABLE)]
    finally:
        if LOAD_LOCK._is_owned():  # type: ignore[attr-defined]
            LOAD_LOCK.release()
        daemon.stop()
        registry.close()


def test_queue_full_is_retried(daemon: RunningDaemon, gate: ForwardGate) -> None:
    seen: list[Code] = []

    def on_retry(attempt: int, code: Code, delay: float) -> None:
        seen.append(code)
        gate.release.set()  # the queue drains, the retry gets in

    gate.hold()
    with (
        ModelCacheClient(daemon.address, timeout=60) as c,
        ModelCacheClient(
            daemon.address, timeout=60, retry=RetryPolicy(on_retry=on_retry)
        ) as retrying,
    ):
        held = threading.Thread(target=c.logprobs, args=("gpt2", ["hold"]))
        held.start()
        assert gate.entered.wait(10)
        fillers = [
            threading.Thread(target=c.logprobs, args=("gpt2", [f"f{i}"] * 256)) for i in range(4)
        ]
        for t in fillers:
            t.start()
        wait_for(lambda: metric("modelcache_queue_depth", model="gpt2") == 1024, "a full queue")
        assert retrying.logprobs("gpt2", ["let me in"])[0].logprobs.size > 0
        for t in [held, *fillers]:
            t.join(60)
    assert seen[:1] == [Code.RESOURCE_EXHAUSTED]


def test_deadline_is_final_and_prompt(daemon: RunningDaemon, gate: ForwardGate) -> None:
    gate.hold()
    with ModelCacheClient(daemon.address) as c:
        held = threading.Thread(target=c.logprobs, args=("gpt2", ["hold"]))
        held.start()
        assert gate.entered.wait(10)
        with pytest.raises(ModelCacheError) as info:
            c.logprobs("gpt2", ["too slow"], timeout=0.3)
        assert info.value.code == Code.DEADLINE_EXCEEDED
        gate.release.set()
        held.join(30)


def test_cancelling_an_async_call_drops_it_from_the_queue(
    daemon: RunningDaemon, gate: ForwardGate
) -> None:
    def cancelled() -> float:
        return metric(
            "modelcache_requests_total", model="gpt2", method="LogProbs", code="CANCELLED"
        )

    before = cancelled()

    async def main() -> None:
        async with AsyncModelCacheClient(daemon.address) as ac:
            gate.hold()
            held = asyncio.ensure_future(ac.logprobs("gpt2", ["hold"]))
            await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 10)
            doomed = asyncio.ensure_future(ac.logprobs("gpt2", token_ids=[[101, 6161, 102]]))
            await asyncio.get_running_loop().run_in_executor(
                None,
                wait_for,
                lambda: metric("modelcache_queue_depth", model="gpt2") == 1,
                "the request to queue",
            )
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            await asyncio.get_running_loop().run_in_executor(
                None, wait_for, lambda: cancelled() == before + 1, "the server to drop it"
            )
            gate.release.set()
            await held
            await ac.logprobs("gpt2", ["after"])

    asyncio.run(main())
    assert not [row for row in gate.seen if 6161 in row]


def test_wait_until_serving_waits_for_a_server_that_is_not_up_yet(
    session_config: Any, session_registry: ModelRegistry
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = DaemonSettings(host="127.0.0.1", port=port, metrics_port=0, grpc_threads=2)
    box: dict[str, RunningDaemon] = {}
    with ModelCacheClient(f"127.0.0.1:{port}", timeout=30) as c:
        # The server comes up only after the client has started waiting for it.
        starter = threading.Timer(
            0.3,
            lambda: box.setdefault("d", RunningDaemon(session_config, session_registry, settings)),
        )
        starter.start()
        try:
            c.wait_until_serving("minilm", timeout=60)
            assert c.embed("minilm", ["up"]).shape == (1, 384)
        finally:
            starter.join()
            box["d"].stop()


def test_a_cancelled_from_a_stopping_server_is_retried() -> None:
    """A gRPC server that stops aborts the calls it accepted with CANCELLED; the calls are
    pure reads, so the client retries them (a real server, no stand-in for the channel)."""
    from concurrent import futures

    from modelcache.v1 import modelcache_pb2 as pb
    from modelcache.v1 import modelcache_pb2_grpc as pb_grpc

    calls: list[int] = []

    class Stopping(pb_grpc.ModelCacheServicer):
        def ListModels(self, request: Any, context: grpc.ServicerContext) -> Any:
            calls.append(1)
            if len(calls) == 1:
                context.abort(grpc.StatusCode.CANCELLED, "server is stopping")
            return pb.ListModelsResponse(config_hash="after-retry")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ModelCacheServicer_to_server(Stopping(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        retries: list[tuple[int, Any]] = []
        policy = RetryPolicy(initial_backoff=0.01, on_retry=lambda n, c, d: retries.append((n, c)))
        with ModelCacheClient(f"127.0.0.1:{port}", retry=policy, timeout=10) as c:
            assert c.list_models() is not None
        assert retries == [(1, grpc.StatusCode.CANCELLED)] and len(calls) == 2
    finally:
        server.stop(None)
