"""Faults (issue #6): damaged checkpoints next to good ones, SIGKILL in the middle of a
load and of a request, and forward passes that raise — through the real server.

Covered elsewhere and not repeated here: one forward exception on a lone LogProbs request
(test_serving: INTERNAL, the worker serves on), worker deaths and restarts, a truncated
model in the session daemon (test_serving.test_list_models_reports_everything), each
loader failure class in isolation (test_loader_files), remote code never run
(test_loader_files.test_remote_code_is_never_run_unless_trusted).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fault_models as fm
import grpc
import numpy as np
import pytest
import tiny_models
import torch
import transformers
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelcache.client import ModelCacheClient, RetryPolicy
from modelcache.daemon.registry import ModelRegistry
from modelcache.v1 import modelcache_pb2 as pb
from modelcache.v1 import modelcache_pb2_grpc as pb_grpc

pytest.register_assert_rewrite("daemon_process", "serving_fixtures")
from daemon_process import ServeProcess  # noqa: E402
from serving_fixtures import ForwardGate, RunningDaemon, metric, wait_for  # noqa: E402

pytest_plugins = ("serving_fixtures",)
Code = grpc.StatusCode
READY, FAILED, LOADING = pb.ModelStatus.READY, pb.ModelStatus.FAILED, pb.ModelStatus.LOADING
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def code_of(call: Any, req: Any, timeout: float = 30) -> tuple[Code, str]:
    try:
        call(req, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return Code.OK, ""


# -- damaged checkpoints: each fails alone, with its reason; the others serve -----------
def _sharded_without_a_shard(dest: Path) -> Path:
    torch.manual_seed(5)
    cfg = transformers.GPT2Config(
        vocab_size=tiny_models.VOCAB,
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=101,
        eos_token_id=102,
    )
    transformers.GPT2LMHeadModel(cfg).save_pretrained(dest, max_shard_size="1MB")
    tiny_models.copy_tokenizer(dest)
    shards = sorted(dest.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    shards[-1].unlink()
    return shards[-1]


def _nan_row(path: Path, name_part: str, row: int) -> str:
    """One row of an embedding matrix NaN, in place: the file is otherwise valid and the
    canary's own tokens do not use that row."""
    import json
    import struct

    f = path / "model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if name_part in k)
    start, _ = header[name]["data_offsets"]
    width = header[name]["shape"][1]
    with f.open("r+b") as fh:
        fh.seek(8 + n + start + row * width * 4)
        fh.write(struct.pack("<f", float("nan")) * width)
    return name


@pytest.fixture(scope="module")
def broken_daemon(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServeProcess, dict[str, Path]]]:
    root = tmp_path_factory.mktemp("broken-models")
    good_lm, good_emb = tiny_models.gpt2(root / "good-lm"), tiny_models.bert(root / "good-emb")
    paths = {"good-lm": good_lm, "good-emb": good_emb}
    for name, damage in (
        ("truncated", fm.truncate_weights),
        ("garbled", fm.garble_header),
        ("missing", fm.remove_weights),
    ):
        damage(p := fm.copy_model(good_lm, root / name))
        paths[name] = p
    paths["missing-shard"] = root / "missing-shard"
    paths["missing-shard-file"] = _sharded_without_a_shard(paths["missing-shard"])
    paths["nan-row"] = fm.copy_model(good_emb, root / "nan-row")
    _nan_row(paths["nan-row"], "word_embeddings", 4242)
    paths["remote-code"] = fm.needs_remote_code(fm.copy_model(good_emb, root / "remote-code"))
    tasks = {"good-emb": "embedding", "nan-row": "embedding", "remote-code": "embedding"}
    config = {
        "models": [
            {"name": n, "source": str(paths[n]), "task": tasks.get(n, "causal-lm")}
            for n in (
                "good-lm",
                "good-emb",
                "truncated",
                "garbled",
                "missing",
                "missing-shard",
                "nan-row",
                "remote-code",
            )
        ]
    }
    with ServeProcess(config, tmp_path_factory.mktemp("broken"), name="broken") as proc:
        proc.wait_settled()
        yield proc, paths
    assert proc.proc is not None and proc.proc.returncode != 97  # the remote code never ran


@pytest.mark.slow
def test_damaged_checkpoints_fail_alone_with_their_reason(
    broken_daemon: tuple[ServeProcess, dict[str, Path]],
) -> None:
    proc, paths = broken_daemon
    models = {m.name: m for m in proc.list_models().models}
    expect = {
        "truncated": (
            "corrupt_weights",
            [str(paths["truncated"] / "model.safetensors"), "truncated"],
        ),
        "garbled": (
            "corrupt_weights",
            [str(paths["garbled"] / "model.safetensors"), "not valid JSON"],
        ),
        "missing": ("not_found", ["no model.safetensors", str(paths["missing"])]),
        "missing-shard": ("not_found", [str(paths["missing-shard-file"])]),
        "nan-row": ("verify_failed", ["NaN", "embeddings.word_embeddings.weight"]),
        "remote-code": ("remote_code", ["trust_remote_code"]),
    }
    for name, (error_class, phrases) in expect.items():
        m = models[name]
        assert (m.state, m.error_class) == (FAILED, error_class), (name, m.error)
        assert all(p in m.error for p in phrases), (name, m.error)
        assert m.fingerprint == "" and m.weight_bytes == 0
    assert models["good-lm"].state == models["good-emb"].state == READY

    with grpc.insecure_channel(proc.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.ModelCacheStub(channel)  # type: ignore[no-untyped-call]

        def status(service: str) -> int:
            return int(
                health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            )

        assert status("good-lm") == status("good-emb") == SERVING
        assert all(status(n) == NOT_SERVING for n in expect)
        assert status("") == NOT_SERVING  # not every model is ready
        for name, (error_class, _) in expect.items():
            call = stub.Embed if name in ("nan-row", "remote-code") else stub.LogProbs
            req = (
                pb.EmbedRequest(model=name, inputs=["x"])
                if call is stub.Embed
                else pb.LogProbsRequest(model=name, inputs=["x"])
            )
            code, details = code_of(call, req)
            assert code == Code.FAILED_PRECONDITION, (name, code, details)
            assert f"failed to load ({error_class})" in details, details

        # the good ones serve, and serve the right numbers
        ids = [101, 4242, 2023, 102]  # 4242: the NaN row of the broken copy
        emb = stub.Embed(pb.EmbedRequest(model="good-emb", inputs=["a b c"]), timeout=30)
        assert np.isfinite(np.frombuffer(emb.embeddings, "<f4")).all()
        lp = stub.LogProbs(
            pb.LogProbsRequest(model="good-lm", token_ids=[pb.TokenIds(ids=ids)]), timeout=30
        )
        ref = tiny_models.reference(paths["good-lm"], "causal-lm")
        with torch.inference_mode():
            logits = ref(input_ids=torch.tensor([ids])).logits[0, :-1]
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        np.testing.assert_allclose(
            np.frombuffer(lp.sequences[0].logprobs, "<f4"), want.numpy(), atol=1e-4
        )
    assert proc.alive()


# -- SIGKILL mid-request and mid-load; the restart is the same model --------------------
@pytest.fixture(scope="module")
def big_model() -> Path:
    """A ~500 MB GPT-2 (loads in ~2 s here: long enough to be caught LOADING), cached like
    bench/bench_load.py's, which it is when that benchmark has run."""
    root = Path(
        os.environ.get("MODELCACHE_BENCH_CACHE", Path.home() / ".cache" / "modelcache-bench")
    )
    return fm.big_gpt2(root, size_mb=500)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_mid_request_and_mid_load_then_the_same_model_serves(
    big_model: Path, tmp_path: Path
) -> None:
    config = {"models": [{"name": "big", "source": str(big_model), "task": "causal-lm"}]}
    proc = ServeProcess(config, tmp_path, name="big")
    probe = pb.LogProbsRequest(
        model="big", token_ids=[pb.TokenIds(ids=[101, 2023, 2003, 102])], top_k=3, entropy=True
    )
    long = pb.LogProbsRequest(
        model="big",
        token_ids=[pb.TokenIds(ids=list(range(1000 + i, 1500 + i))) for i in range(8)],
        entropy=True,
    )
    try:
        proc.start()
        listing = proc.wait_settled()
        (first,) = listing.models
        assert first.state == READY, first.error
        with grpc.insecure_channel(proc.address) as channel:
            stub = pb_grpc.ModelCacheStub(channel)  # type: ignore[no-untyped-call]
            answer = stub.LogProbs(probe, timeout=60).SerializeToString(deterministic=True)

            # 1. mid-request: a batch of 8 x 500 tokens is computing when the process dies
            started = proc.metric(
                "modelcache_request_duration_seconds_count", model="big", phase="queue"
            )
            inflight = stub.LogProbs.future(long, timeout=120)
            wait_for(
                lambda: (
                    proc.metric(
                        "modelcache_request_duration_seconds_count", model="big", phase="queue"
                    )
                    > started
                ),
                "the long batch to start",
                timeout=60,
            )
            assert proc.kill(signal.SIGKILL) == -signal.SIGKILL
            assert inflight.exception(60) is not None
            assert inflight.code() == Code.UNAVAILABLE, inflight.details()

        # 2. mid-load: restarted on the same port, killed while the weights are read
        port = proc.port
        proc.start()
        assert proc.port == port
        wait_for(lambda: proc.states().get("big") == LOADING, "the load to begin", timeout=120)
        assert proc.kill(signal.SIGKILL) == -signal.SIGKILL

        # 3. a client retrying through the downtime and the next load gets its answer
        retries: list[str] = []
        policy = RetryPolicy(
            max_attempts=1000,
            initial_backoff=0.05,
            max_backoff=0.5,
            on_retry=lambda n, code, delay: retries.append(code.name),
        )
        outcome: dict[str, Any] = {}

        def patient() -> None:
            with ModelCacheClient(proc.address, retry=policy, timeout=240, seed=3) as c:
                outcome["result"] = c.logprobs("big", token_ids=[[101, 2023, 2003, 102]])

        waiter = threading.Thread(target=patient)
        waiter.start()
        wait_for(lambda: len(retries) >= 3, "the client to be refused while down")
        proc.start()
        listing = proc.wait_settled()
        waiter.join(240)
        assert not waiter.is_alive() and "result" in outcome
        assert set(retries) == {"UNAVAILABLE"}, retries  # down, then loading: both retried
        (again,) = listing.models
        assert again.state == READY
        assert (again.fingerprint, again.revision, again.weight_bytes) == (
            first.fingerprint,
            first.revision,
            first.weight_bytes,
        )
        with grpc.insecure_channel(proc.address) as channel:
            stub = pb_grpc.ModelCacheStub(channel)  # type: ignore[no-untyped-call]
            assert stub.LogProbs(probe, timeout=60).SerializeToString(deterministic=True) == answer
        got = outcome["result"][0].logprobs
        want = np.frombuffer(pb.LogProbsResponse.FromString(answer).sequences[0].logprobs, "<f4")
        np.testing.assert_array_equal(got, want)
        print(
            f"\nrestart: fingerprint {again.fingerprint[:16]} both times; the retrying "
            f"client was refused {len(retries)} times (UNAVAILABLE) before its answer"
        )
    finally:
        if proc.alive():
            proc.stop()
    assert proc.starts == 3


# -- forward passes that raise: only the requests that caused it fail --------------------
@pytest.fixture
def lm_gate(session_registry: ModelRegistry) -> Iterator[ForwardGate]:
    loaded = session_registry.entry("gpt2").loaded
    assert loaded is not None
    gate = ForwardGate(loaded.model)
    yield gate
    gate.close()


@pytest.fixture
def emb_gate(session_registry: ModelRegistry) -> Iterator[ForwardGate]:
    loaded = session_registry.entry("bert-cls").loaded
    assert loaded is not None
    gate = ForwardGate(loaded.model)
    yield gate
    gate.close()


def test_an_exception_in_an_embedding_forward_is_internal_and_it_serves_on(
    daemon: RunningDaemon, emb_gate: ForwardGate
) -> None:
    tok = daemon.registry.entry("bert-cls").loaded.tokenizer  # type: ignore[union-attr]
    word = "zebra"
    (marker,) = tok(word, add_special_tokens=False)["input_ids"]
    emb_gate.raise_on[marker] = ValueError("injected embedding failure")
    restarts = metric("modelcache_worker_restarts_total", model="bert-cls")
    with grpc.insecure_channel(daemon.address) as channel:
        stub = pb_grpc.ModelCacheStub(channel)  # type: ignore[no-untyped-call]
        code, details = code_of(stub.Embed, pb.EmbedRequest(model="bert-cls", inputs=[word]))
        assert code == Code.INTERNAL and "ValueError: injected embedding failure" in details
        ok = stub.Embed(pb.EmbedRequest(model="bert-cls", inputs=["fine"]), timeout=30)
        assert ok.rows == 1
    assert metric("modelcache_worker_restarts_total", model="bert-cls") == restarts


def test_a_raising_request_does_not_fail_the_requests_batched_with_it(
    daemon: RunningDaemon, lm_gate: ForwardGate
) -> None:
    """Only the request that makes the forward pass raise gets INTERNAL; requests that were
    in the same batch are computed again without it and get their answers."""
    innocent = [[101, 2000 + i, 2001 + i, 102] for i in range(3)]
    with grpc.insecure_channel(daemon.address) as channel:
        stub = pb_grpc.ModelCacheStub(channel)  # type: ignore[no-untyped-call]
        alone = [
            stub.LogProbs(
                pb.LogProbsRequest(model="gpt2", token_ids=[pb.TokenIds(ids=ids)]), timeout=30
            )
            .sequences[0]
            .logprobs
            for ids in innocent
        ]
        lm_gate.raise_on[4848] = RuntimeError("injected batch failure")
        lm_gate.hold()
        blocker = stub.LogProbs.future(pb.LogProbsRequest(model="gpt2", inputs=["hold"]))
        assert lm_gate.entered.wait(10)
        poison = stub.LogProbs.future(
            pb.LogProbsRequest(model="gpt2", token_ids=[pb.TokenIds(ids=[101, 4848, 102])]),
            timeout=60,
        )
        others = [
            stub.LogProbs.future(
                pb.LogProbsRequest(model="gpt2", token_ids=[pb.TokenIds(ids=ids)]), timeout=60
            )
            for ids in innocent
        ]
        wait_for(
            lambda: metric("modelcache_queue_depth", model="gpt2") == 4,
            "poison and innocents queued together",
        )
        seen = len(lm_gate.seen)
        lm_gate.release.set()
        blocker.result(30)
        assert poison.exception(30) is not None and poison.code() == Code.INTERNAL
        assert "RuntimeError: injected batch failure" in poison.details()
        for fut, want in zip(others, alone, strict=True):
            got = np.frombuffer(fut.result(30).sequences[0].logprobs, "<f4")
            np.testing.assert_allclose(got, np.frombuffer(want, "<f4"), atol=1e-5)
        # they were in one batch with it (which failed), then computed without it
        first, rest = lm_gate.seen[seen : seen + 4], lm_gate.seen[seen + 4 :]
        assert sum(4848 in r for r in first) == 1 and len(first) == 4
        assert len(rest) == 4 and sum(4848 in r for r in rest) == 1
        after = stub.LogProbs(pb.LogProbsRequest(model="gpt2", inputs=["after"]), timeout=30)
        assert len(after.sequences) == 1


def test_many_raising_requests_at_once_leave_the_worker_serving(
    daemon: RunningDaemon, lm_gate: ForwardGate
) -> None:
    lm_gate.raise_on[4949] = RuntimeError("again")
    restarts = metric("modelcache_worker_restarts_total", model="gpt2")
    with grpc.insecure_channel(daemon.address) as channel:
        stub = pb_grpc.ModelCacheStub(channel)  # type: ignore[no-untyped-call]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(
                pool.map(
                    lambda i: code_of(
                        stub.LogProbs,
                        pb.LogProbsRequest(
                            model="gpt2", token_ids=[pb.TokenIds(ids=[101, 4949, 100 + i])]
                        ),
                    )[0],
                    range(32),
                )
            )
        assert codes == [Code.INTERNAL] * 32
        ok = stub.LogProbs(pb.LogProbsRequest(model="gpt2", inputs=["still here"]), timeout=30)
        assert len(ok.sequences) == 1
    assert metric("modelcache_worker_restarts_total", model="gpt2") == restarts
