"""The daemon end to end: real servers on loopback, real clients, real models.

Correctness against independent references (sentence-transformers, a direct forward +
log_softmax), isolation under concurrency, health while a model loads, every bad-input
status, garbage on the wire, queue bounds, deadlines, cancellation, forward exceptions,
worker deaths, reflection, metrics, TLS, and the `modelcache serve` process itself.
"""

from __future__ import annotations

import concurrent.futures
import random
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import transformers
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from modelcache.client import ModelCacheClient
from modelcache.config import parse_config
from modelcache.daemon.globalstate import LOAD_LOCK
from modelcache.daemon.registry import ModelRegistry, ModelState
from modelcache.examples import bundled_minilm
from modelcache.settings import DaemonSettings
from modelcache.v1 import modelcache_pb2 as pb
from modelcache.v1 import modelcache_pb2_grpc as pb_grpc

pytest.register_assert_rewrite("serving_fixtures")
from serving_fixtures import (  # noqa: E402
    ForwardGate,
    RunningDaemon,
    metric,
    minilm_spec,
    model,
    wait_for,
)

pytest_plugins = ("serving_fixtures",)

Code = grpc.StatusCode
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TEXTS = [
    "A cat.",
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "Embeddings from modelcache must equal those of sentence-transformers, row by row, "
    "for short and long inputs alike, whatever else is in the batch.",
    "Ünïcödé and emoji 🙂 survive tokenization.",
    "word " * 400,
]


class WorkerKill(BaseException):
    """Ends the worker thread (not an Exception: the per-batch handler cannot catch it)."""


@pytest.fixture(scope="module")
def stub(daemon: RunningDaemon) -> Any:
    with grpc.insecure_channel(daemon.address) as channel:
        yield pb_grpc.ModelCacheStub(channel)


@pytest.fixture(scope="module")
def client(daemon: RunningDaemon) -> Any:
    with ModelCacheClient(daemon.address, timeout=60) as c:
        yield c


@pytest.fixture
def gate(session_registry: ModelRegistry) -> Any:
    loaded = session_registry.entry("gpt2").loaded
    assert loaded is not None
    g = ForwardGate(loaded.model)
    yield g
    g.close()


def code_of(fn: Any, *args: Any, **kw: Any) -> tuple[Code, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    return info.value.code(), info.value.details()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# -- correctness ---------------------------------------------------------------------
def test_embeddings_equal_sentence_transformers(client: ModelCacheClient) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(bundled_minilm()), device="cpu")
    want = reference.encode(TEXTS, batch_size=32, convert_to_numpy=True)
    result = client.embed_result("minilm", TEXTS)
    got = result.embeddings
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    assert cosines(got, want).min() >= 0.9999
    assert result.token_counts[-1] == 256 and result.fingerprint and result.revision
    raw = client.embed("minilm", TEXTS, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), got, atol=1e-5)


def test_cls_pooling_equals_a_direct_forward(
    client: ModelCacheClient, tiny_lms: dict[str, Path]
) -> None:
    ref = transformers.AutoModel.from_pretrained(str(tiny_lms["bert"])).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_lms["bert"]))
    got = client.embed("bert-cls", TEXTS[:4])
    with torch.inference_mode():
        for row, text in enumerate(TEXTS[:4]):
            want = ref(**tok(text, return_tensors="pt")).last_hidden_state[0, 0].numpy()
            np.testing.assert_allclose(got[row], want, atol=1e-4)


#: How far batching (padding, other rows in the forward) may move any log-prob, over the whole
#: vocabulary: ten times the 1e-4 the observed tokens are held to (measured: <= 1e-6).
BATCHING_EPS = 1e-3
U32 = 2.0**-24  # float32 unit roundoff


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_logprobs_equal_a_direct_forward(
    client: ModelCacheClient, tiny_lms: dict[str, Path], name: str
) -> None:
    """Token by token against transformers. The statistics are checked exactly on unbatched
    passes (one unpadded sequence per forward, the reference's own shapes), where only float32
    rounding separates them from the float64 reference; on the batched pass they are checked
    against the unbatched pass with the bounds that follow from BATCHING_EPS: for log-probs
    moved by at most e, |dE[log p]| <= e (1 + sd) and |dVar| <= 4 sd e + e Var + 4 e^2."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_lms[name])).eval()
    stats = {"top_k": 5, "entropy": True, "expected_logprob": True, "rank": True}
    seqs = client.logprobs(name, TEXTS, **stats)
    by_ids = client.logprobs(name, token_ids=[s.token_ids for s in seqs])
    for s, again in zip(seqs, by_ids, strict=True):
        (alone,) = client.logprobs(name, token_ids=[s.token_ids], **stats)
        ids = torch.from_numpy(s.token_ids.astype(np.int64))[None]
        with torch.inference_mode():
            lp = torch.log_softmax(ref(input_ids=ids).logits[0, :-1].float(), -1)
        obs = lp.gather(-1, ids[0, 1:, None])[:, 0]
        assert np.abs(s.logprobs - obs.numpy()).max() <= 1e-4
        assert np.abs(again.logprobs - s.logprobs).max() <= 1e-4
        lp64 = lp.double()
        p = lp64.exp()
        mean = (p * lp64).sum(-1).numpy()
        var = (p * (lp64 - torch.from_numpy(mean)[:, None]) ** 2).sum(-1).numpy()
        sd = np.sqrt(var)
        # Unbatched: float32 sums over V terms (pairwise: log2 V roundings each) and log-probs
        # rounded to float32 (|log p| * u each, moving Var by up to 4 sd of that).
        depth = np.ceil(np.log2(lp.shape[-1]))
        lp_round = U32 * float(lp.abs().max())
        tol_mean = 2 * depth * U32 * np.abs(mean) + 2 * lp_round
        tol_var = 2 * depth * U32 * var + 4 * sd * lp_round + 1e-9
        assert alone.entropy is not None and alone.expected_logprob is not None
        assert alone.logprob_variance is not None
        assert (np.abs(alone.entropy + mean) <= tol_mean).all()
        assert (np.abs(alone.expected_logprob - mean) <= tol_mean).all()
        assert (np.abs(alone.logprob_variance - var) <= tol_var).all()
        # Batched: within what BATCHING_EPS allows of the unbatched pass.
        e = BATCHING_EPS
        assert s.entropy is not None and s.expected_logprob is not None
        assert s.logprob_variance is not None
        assert (np.abs(s.entropy - alone.entropy) <= e * (1 + sd)).all()
        assert (np.abs(s.expected_logprob - alone.expected_logprob) <= e * (1 + sd)).all()
        bound = 4 * sd * e + e * var + 4 * e * e
        assert (np.abs(s.logprob_variance - alone.logprob_variance) <= bound).all()
        lo = (lp > obs[:, None] + 1e-4).sum(-1).numpy()
        hi = (lp > obs[:, None] - 1e-4).sum(-1).numpy()
        assert s.rank is not None and ((lo <= s.rank) & (s.rank <= hi)).all()
        assert s.top_k_logprobs is not None and s.top_k_ids is not None
        np.testing.assert_allclose(s.top_k_logprobs, lp.topk(5, -1).values.numpy(), atol=1e-4)
        picked = lp.gather(-1, torch.from_numpy(s.top_k_ids.astype(np.int64)))
        np.testing.assert_allclose(picked.numpy(), s.top_k_logprobs, atol=1e-4)
        assert again.entropy is None and again.rank is None and again.top_k_ids is None


def test_concurrent_clients_get_exactly_their_own_results(
    client: ModelCacheClient, gate: ForwardGate
) -> None:
    jobs = [
        (k, [f"client {k} sentence {j} " + "more words " * (k % 7) for j in range(1 + k % 3)])
        for k in range(24)
    ]
    embeds = {k: client.embed("minilm", texts) for k, texts in jobs}
    logprobs = {k: client.logprobs("gpt2", texts) for k, texts in jobs}
    batches_before = metric("modelcache_batch_size_count", model="gpt2")
    gate.hold()  # everything below queues up behind one held gpt2 batch, then is merged
    blocker = threading.Thread(target=client.logprobs, args=("gpt2", ["hold the worker"]))
    blocker.start()
    assert gate.entered.wait(10)

    def both(k: int, texts: list[str]) -> tuple[int, np.ndarray, list[Any]]:
        return k, client.embed("minilm", texts), client.logprobs("gpt2", texts)

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(both, k, texts) for k, texts in jobs]
        wait_for(
            lambda: metric("modelcache_queue_depth", model="gpt2") == sum(len(t) for _, t in jobs),
            "every gpt2 request to be queued",
        )
        gate.release.set()
        for fut in concurrent.futures.as_completed(futures):
            k, emb, lps = fut.result()
            np.testing.assert_allclose(emb, embeds[k], atol=1e-5)
            for got, want in zip(lps, logprobs[k], strict=True):
                np.testing.assert_array_equal(got.token_ids, want.token_ids)
                np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
    blocker.join(10)
    # 1 held batch + the 48 queued sequences in at most 2 batches (max_batch_size 64).
    assert metric("modelcache_batch_size_count", model="gpt2") - batches_before <= 3


# -- health, listing, reflection, metrics ----------------------------------------------
def test_health_per_model_and_overall(daemon: RunningDaemon) -> None:
    with grpc.insecure_channel(daemon.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def check(service: str) -> int:
            return int(health.Check(health_pb2.HealthCheckRequest(service=service)).status)

        assert check("minilm") == check("gpt2") == check("bert-cls") == SERVING
        assert check("broken") == NOT_SERVING
        assert check("") == NOT_SERVING  # not every model is ready: one failed
        assert (
            code_of(health.Check, health_pb2.HealthCheckRequest(service="nope"))[0]
            == Code.NOT_FOUND
        )


def test_health_follows_a_slow_load(tiny_lms: dict[str, Path]) -> None:
    config = parse_config(
        {
            "models": [
                model("slow", tiny_lms["gpt2"], "causal-lm"),
                model("later", tiny_lms["bert"], "embedding"),
            ]
        }
    )
    registry = ModelRegistry(config)
    registry.prepare()
    loading = threading.Event()
    registry.add_listener(lambda n, s: loading.set() if s is ModelState.LOADING else None)
    LOAD_LOCK.acquire()  # every load waits for this lock: "slow" stays LOADING until released
    released = False
    daemon = RunningDaemon(config, registry)
    try:
        registry.start_all()
        assert loading.wait(10)
        with ModelCacheClient(daemon.address, retry=None, timeout=10) as c:
            states = {m.name: m.state for m in c.list_models().models}
            assert states == {"slow": "loading", "later": "pending"}
            assert c.health() == c.health("slow") == c.health("later") == "NOT_SERVING"
        with grpc.insecure_channel(daemon.address) as channel:
            code, details = code_of(
                pb_grpc.ModelCacheStub(channel).LogProbs,
                pb.LogProbsRequest(model="slow", inputs=["x"]),
            )
            assert code == Code.UNAVAILABLE and "not ready yet (state loading)" in details
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=30
            )
            assert next(watch).status == NOT_SERVING
            LOAD_LOCK.release()
            released = True
            assert next(watch).status == SERVING
            watch.cancel()
        with ModelCacheClient(daemon.address, timeout=10) as c:
            assert c.logprobs("slow", ["now it works"])[0].logprobs.shape == (4,)
    finally:
        if not released:
            LOAD_LOCK.release()
        daemon.stop()
        registry.close()


def test_list_models_reports_everything(client: ModelCacheClient) -> None:
    listing = client.list_models()
    models = {m.name: m for m in listing.models}
    assert list(models) == ["minilm", "gpt2", "llama", "bert-cls", "broken"]
    m = models["minilm"]
    assert (m.state, m.task, m.device, m.dtype, m.max_length, m.output_dims) == (
        "ready",
        "embedding",
        "cpu",
        "float32",
        256,
        384,
    )
    assert m.weight_bytes > 80_000_000 and len(m.fingerprint) == 64 and m.revision
    assert {"resolve", "read", "materialize", "verify", "warmup", "total"} <= set(m.load_seconds)
    assert models["gpt2"].output_dims == 30522 and models["gpt2"].task == "causal-lm"
    broken = models["broken"]
    assert broken.state == "failed" and broken.error_class == "corrupt_weights" and broken.error
    assert set(listing.versions) == {"modelcache", "torch", "transformers", "python", "cuda"}


def test_reflection_lists_and_describes_the_service(daemon: RunningDaemon) -> None:
    with grpc.insecure_channel(daemon.address) as channel:
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="modelcache.v1.ModelCache"
            ),
        ]
        listed, described = list(refl.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"modelcache.v1.ModelCache", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in described.file_descriptor_response.file_descriptor_proto
    ]
    assert "modelcache/v1/modelcache.proto" in {f.name for f in files}


def test_metrics_endpoint_counts_requests(daemon: RunningDaemon, client: ModelCacheClient) -> None:
    client.embed("minilm", ["count me"])
    with urllib.request.urlopen(
        f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10
    ) as resp:
        body = resp.read().decode()
    for needle in (
        'modelcache_requests_total{code="OK",method="Embed",model="minilm"}',
        'modelcache_request_duration_seconds_count{method="Embed",model="minilm",phase="queue"}',
        'modelcache_batch_size_count{model="minilm"}',
        'modelcache_tokens_total{method="Embed",model="minilm"}',
        'modelcache_queue_depth{model="minilm"}',
    ):
        assert needle in body, needle


# -- bad input -----------------------------------------------------------------------
LONG = "word " * 400
BAD = [
    ("Embed", pb.EmbedRequest(model="", inputs=["x"]), Code.INVALID_ARGUMENT, "model is required"),
    ("Embed", pb.EmbedRequest(model="nope", inputs=["x"]), Code.NOT_FOUND, "'nope' is not conf"),
    (
        "Embed",
        pb.EmbedRequest(model="gpt2", inputs=["x"]),
        Code.FAILED_PRECONDITION,
        "causal-lm model; Embed needs an embedding model",
    ),
    (
        "LogProbs",
        pb.LogProbsRequest(model="minilm", inputs=["x"]),
        Code.FAILED_PRECONDITION,
        "embedding model; LogProbs needs a causal-lm model",
    ),
    (
        "LogProbs",
        pb.LogProbsRequest(model="broken", inputs=["x"]),
        Code.FAILED_PRECONDITION,
        "failed to load (corrupt_weights)",
    ),
    ("Embed", pb.EmbedRequest(model="minilm"), Code.INVALID_ARGUMENT, "inputs is empty"),
    (
        "Embed",
        pb.EmbedRequest(model="minilm", inputs=["a", ""]),
        Code.INVALID_ARGUMENT,
        "inputs[1] is empty",
    ),
    (
        "Embed",
        pb.EmbedRequest(model="minilm", inputs=["a"] * 257),
        Code.INVALID_ARGUMENT,
        "257 inputs; at most 256",
    ),
    (
        "Embed",
        pb.EmbedRequest(model="minilm", inputs=["a", "b" * 200_001]),
        Code.INVALID_ARGUMENT,
        "inputs[1] has 200001 characters; at most 200000",
    ),
    (
        "Embed",
        pb.EmbedRequest(model="minilm", inputs=["a", LONG]),
        Code.INVALID_ARGUMENT,
        "inputs[1] has 402 tokens, more than the model's max_length 256",
    ),
    (
        "LogProbs",
        pb.LogProbsRequest(model="gpt2", inputs=["x"], top_k=21),
        Code.INVALID_ARGUMENT,
        "top_k 21 is out of range 0..20",
    ),
    (
        "LogProbs",
        pb.LogProbsRequest(model="gpt2", inputs=["x"], token_ids=[pb.TokenIds(ids=[1])]),
        Code.INVALID_ARGUMENT,
        "exactly one of inputs and token_ids must be set (both is)",
    ),
    ("LogProbs", pb.LogProbsRequest(model="gpt2"), Code.INVALID_ARGUMENT, "(neither is)"),
    (
        "LogProbs",
        pb.LogProbsRequest(model="gpt2", inputs=[""]),
        Code.INVALID_ARGUMENT,
        "inputs[0] is empty",
    ),
    (
        "LogProbs",
        pb.LogProbsRequest(model="gpt2", token_ids=[pb.TokenIds(ids=[5, 30522])]),
        Code.INVALID_ARGUMENT,
        "token_ids[0][1] = 30522 is outside the vocabulary [0, 30522)",
    ),
    (
        "LogProbs",
        pb.LogProbsRequest(model="gpt2", token_ids=[pb.TokenIds(ids=[1]), pb.TokenIds(ids=[-3])]),
        Code.INVALID_ARGUMENT,
        "token_ids[1][0] = -3",
    ),
    (
        "LogProbs",
        pb.LogProbsRequest(model="gpt2", token_ids=[pb.TokenIds()]),
        Code.INVALID_ARGUMENT,
        "token_ids[0] is empty",
    ),
    (
        "LogProbs",
        pb.LogProbsRequest(model="gpt2", token_ids=[pb.TokenIds(ids=[7] * 300)]),
        Code.INVALID_ARGUMENT,
        "token_ids[0] has 300 tokens, more than the model's max_length",
    ),
    (
        "LogProbs",
        pb.LogProbsRequest(model="gpt2", token_ids=[pb.TokenIds(ids=[7])] * 257),
        Code.INVALID_ARGUMENT,
        "257 token_ids; at most 256",
    ),
]


@pytest.mark.parametrize(
    ("method", "request_", "code", "message"),
    BAD,
    ids=[f"{i}-{b[3][:30]}" for i, b in enumerate(BAD)],
)
def test_bad_input_gets_a_precise_status(
    stub: Any, method: str, request_: Any, code: Code, message: str
) -> None:
    label = request_.model if request_.model in ("minilm", "gpt2", "broken") else ""
    before = metric("modelcache_requests_total", model=label, method=method, code=code.name)
    got, details = code_of(getattr(stub, method), request_, timeout=30)
    assert (got, message in details) == (code, True), details
    assert (
        metric("modelcache_requests_total", model=label, method=method, code=code.name)
        == before + 1
    )


def test_garbage_bytes_get_a_status_never_a_crash(
    daemon: RunningDaemon, client: ModelCacheClient
) -> None:
    rng = random.Random(3)
    allowed = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION}
    with grpc.insecure_channel(daemon.address) as channel:
        for method in ("Embed", "LogProbs", "ListModels"):
            call = channel.unary_unary(f"/modelcache.v1.ModelCache/{method}")
            for _ in range(150):
                blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 400)))
                try:
                    call(blob, timeout=10)
                except grpc.RpcError as exc:
                    assert exc.code() in allowed, (method, blob, exc.code(), exc.details())
            code, details = code_of(call, b"\x0a\xff\xff\xff\xff\x0f", timeout=10)
            if method != "ListModels":
                assert code == Code.INVALID_ARGUMENT and "is not a valid modelcache.v1" in details
    assert client.embed("minilm", ["still serving"]).shape == (1, 384)


# -- queueing, deadlines, cancellation, failures ----------------------------------------
def test_queue_full_is_resource_exhausted_at_once(stub: Any, gate: ForwardGate) -> None:
    gate.hold()
    held = stub.LogProbs.future(pb.LogProbsRequest(model="gpt2", inputs=["hold"]))
    assert gate.entered.wait(10)
    fill = [
        stub.LogProbs.future(pb.LogProbsRequest(model="gpt2", inputs=[f"q{i}"] * 256))
        for i in range(4)
    ]
    wait_for(lambda: metric("modelcache_queue_depth", model="gpt2") == 1024, "a full queue")
    code, details = code_of(
        stub.LogProbs, pb.LogProbsRequest(model="gpt2", inputs=["more"]), timeout=5
    )
    assert code == Code.RESOURCE_EXHAUSTED and "queue full" in details
    gate.release.set()
    assert len(held.result(30).sequences) == 1
    assert all(len(f.result(60).sequences) == 256 for f in fill)


def test_deadlines_and_cancellation_drop_queued_requests(stub: Any, gate: ForwardGate) -> None:
    gate.hold()
    held = stub.LogProbs.future(pb.LogProbsRequest(model="gpt2", inputs=["hold"]))
    assert gate.entered.wait(10)
    late = metric(
        "modelcache_requests_total", model="gpt2", method="LogProbs", code="DEADLINE_EXCEEDED"
    )
    code, _ = code_of(
        stub.LogProbs,
        pb.LogProbsRequest(model="gpt2", token_ids=[pb.TokenIds(ids=[101, 4242, 102])]),
        timeout=0.3,
    )
    assert code == Code.DEADLINE_EXCEEDED
    wait_for(
        lambda: (
            metric(
                "modelcache_requests_total",
                model="gpt2",
                method="LogProbs",
                code="DEADLINE_EXCEEDED",
            )
            == late + 1
        ),
        "the server to see it",
    )
    cancelled = metric(
        "modelcache_requests_total", model="gpt2", method="LogProbs", code="CANCELLED"
    )
    fut = stub.LogProbs.future(
        pb.LogProbsRequest(model="gpt2", token_ids=[pb.TokenIds(ids=[101, 5252, 102])])
    )
    wait_for(lambda: metric("modelcache_queue_depth", model="gpt2") == 1, "it to queue")
    fut.cancel()
    wait_for(
        lambda: (
            metric("modelcache_requests_total", model="gpt2", method="LogProbs", code="CANCELLED")
            == cancelled + 1
        ),
        "the server to see it",
    )
    gate.release.set()
    held.result(30)
    after = stub.LogProbs(pb.LogProbsRequest(model="gpt2", inputs=["after"]), timeout=30)
    assert len(after.sequences) == 1
    assert not [row for row in gate.seen if 4242 in row or 5252 in row]


def test_an_exception_in_forward_is_internal_and_the_worker_serves_on(
    stub: Any, gate: ForwardGate
) -> None:
    gate.raise_on[4343] = RuntimeError("injected forward failure")
    code, details = code_of(
        stub.LogProbs,
        pb.LogProbsRequest(model="gpt2", token_ids=[pb.TokenIds(ids=[101, 4343])]),
        timeout=30,
    )
    assert code == Code.INTERNAL and "RuntimeError: injected forward failure" in details
    ok = stub.LogProbs(pb.LogProbsRequest(model="gpt2", inputs=["fine"]), timeout=30)
    assert len(ok.sequences) == 1


def test_a_dead_worker_is_reported_and_restarted(
    daemon: RunningDaemon, stub: Any, gate: ForwardGate
) -> None:
    restarts = metric("modelcache_worker_restarts_total", model="gpt2")
    gate.raise_on[4444] = WorkerKill("worker thread killed")
    with grpc.insecure_channel(daemon.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="gpt2"), timeout=30
        )
        assert next(watch).status == SERVING
        code, details = code_of(
            stub.LogProbs,
            pb.LogProbsRequest(model="gpt2", token_ids=[pb.TokenIds(ids=[101, 4444])]),
            timeout=30,
        )
        assert code == Code.INTERNAL and "died while computing this request" in details
        assert next(watch).status == NOT_SERVING
        assert next(watch).status == SERVING
        watch.cancel()
    assert metric("modelcache_worker_restarts_total", model="gpt2") == restarts + 1
    assert (
        len(stub.LogProbs(pb.LogProbsRequest(model="gpt2", inputs=["ok"]), timeout=30).sequences)
        == 1
    )


def test_a_worker_that_keeps_dying_fails_its_model(tiny_lms: dict[str, Path]) -> None:
    config = parse_config({"models": [model("crashy", tiny_lms["gpt2"], "causal-lm")]})
    registry = ModelRegistry(config)
    registry.prepare()
    registry.load_all()
    loaded = registry.entry("crashy").loaded
    assert loaded is not None
    gate = ForwardGate(loaded.model)
    gate.raise_on[4545] = WorkerKill("again")
    daemon = RunningDaemon(config, registry)
    poison = pb.LogProbsRequest(model="crashy", token_ids=[pb.TokenIds(ids=[101, 4545])])
    try:
        with grpc.insecure_channel(daemon.address) as channel:
            stub = pb_grpc.ModelCacheStub(channel)
            for _ in range(6):
                assert code_of(stub.LogProbs, poison, timeout=30)[0] == Code.INTERNAL
            c = ModelCacheClient(daemon.address, timeout=10)
            wait_for(lambda: c.list_models().models[0].state == "failed", "the model to fail")
            info = c.list_models().models[0]
            assert info.error_class == "worker" and "died 6 times" in info.error
            assert c.health("crashy") == c.health() == "NOT_SERVING"
            code, details = code_of(
                stub.LogProbs, pb.LogProbsRequest(model="crashy", inputs=["x"]), timeout=10
            )
            assert code == Code.FAILED_PRECONDITION and "died 6 times" in details
            c.close()
    finally:
        gate.close()
        daemon.stop()
        registry.close()


# -- server settings: limits, TLS, graceful stop, the real process ------------------------
def settings(**kw: Any) -> DaemonSettings:
    return DaemonSettings(
        **{"host": "127.0.0.1", "port": 0, "metrics_port": 0, "grpc_threads": 2, **kw}
    )


def test_oversized_message_is_refused(session_config: Any, session_registry: ModelRegistry) -> None:
    small = RunningDaemon(
        session_config, session_registry, settings(grpc_max_message_bytes=64 * 1024)
    )
    try:
        with grpc.insecure_channel(small.address) as channel:
            code, _ = code_of(
                pb_grpc.ModelCacheStub(channel).Embed,
                pb.EmbedRequest(model="minilm", inputs=["x" * 100_000]),
                timeout=10,
            )
        assert code == Code.RESOURCE_EXHAUSTED
    finally:
        small.stop()


def _certs(d: Path) -> None:
    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=60)

    ossl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "")):
        ossl(
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        (d / f"{name}.ext").write_text(ext + "\n" if ext else "basicConstraints=CA:FALSE\n")
        ossl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )


def test_mutual_tls(tmp_path: Path, session_config: Any, session_registry: ModelRegistry) -> None:
    _certs(tmp_path)
    secure = RunningDaemon(
        session_config,
        session_registry,
        settings(
            tls_cert=tmp_path / "server.pem",
            tls_key=tmp_path / "server.key",
            tls_client_ca=tmp_path / "ca.pem",
        ),
    )
    ca = (tmp_path / "ca.pem").read_bytes()
    try:
        with ModelCacheClient(
            secure.address,
            root_certificates=ca,
            private_key=(tmp_path / "client.key").read_bytes(),
            certificate_chain=(tmp_path / "client.pem").read_bytes(),
            timeout=10,
        ) as c:
            assert c.embed("minilm", ["over mTLS"]).shape == (1, 384)
        for kw in ({"root_certificates": ca}, {}):  # no client certificate; plaintext
            with (
                ModelCacheClient(secure.address, timeout=3, **kw) as c,
                pytest.raises(Exception, match=r"UNAVAILABLE|DEADLINE_EXCEEDED"),
            ):
                c.embed("minilm", ["refused"])
    finally:
        secure.stop()


def test_stop_drains_in_flight_requests(
    session_config: Any, session_registry: ModelRegistry, gate: ForwardGate
) -> None:
    aux = RunningDaemon(session_config, session_registry, settings())
    with grpc.insecure_channel(aux.address) as channel:
        stub = pb_grpc.ModelCacheStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        gate.hold()
        inflight = stub.LogProbs.future(pb.LogProbsRequest(model="gpt2", inputs=["drain me"]))
        assert gate.entered.wait(10)
        stopper = threading.Thread(target=aux.stop, kwargs={"grace": 30})
        stopper.start()
        wait_for(lambda: aux.server.reporter.closed, "the stop to begin")
        gate.release.set()
        assert len(inflight.result(30).sequences) == 1
        stopper.join(30)
        assert not stopper.is_alive()
        assert (
            code_of(health.Check, health_pb2.HealthCheckRequest(), timeout=5)[0] == Code.UNAVAILABLE
        )


def test_modelcache_serve_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"models": [minilm_spec()]}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modelcache.cli",
            "serve",
            "--config",
            str(cfg),
            "--port",
            str(port),
            "--metrics-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        with ModelCacheClient(f"127.0.0.1:{port}", timeout=30) as c:
            c.wait_until_serving(timeout=120)
            assert c.embed("minilm", ["from a real process"]).shape == (1, 384)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0].decode()
    assert "stopping" in out, out
