"""Issue 12's memory target, measured on a real daemon process: one LogProbs request of
4,000 tokens (entropy, E/Var[log p], top-5) on a tiny Llama with a 128,256-token vocabulary
may grow the daemon by at most 1.5 GiB (the full-forward path grew it by 7.7 GiB).

The growth is the daemon's peak RSS during the request (VmHWM, reset through
/proc/PID/clear_refs just before it) minus its RSS before it, after a warm-up request."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import tiny_models
import torch
import transformers
from daemon_process import ServeProcess, proc_status, rss_bytes
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_fixtures import wait_for

from modelcache.v1 import modelcache_pb2 as pb
from modelcache.v1 import modelcache_pb2_grpc as pb_grpc

GIB = 1 << 30
VOCAB = 128_256
TOKENS = 4000


def long_llama(dest: Path) -> Path:
    """A 2-layer, 64-wide Llama with Llama 3's vocabulary size and 4,096 positions."""
    torch.manual_seed(5)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=101,
        eos_token_id=102,
        pad_token_id=0,
    )
    dest.mkdir(parents=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(dest)
    tiny_models.copy_tokenizer(dest)
    tok_cfg = dest / "tokenizer_config.json"
    data = json.loads(tok_cfg.read_text())
    data["model_max_length"] = 4096  # MiniLM's says 512, which would cap max_length
    tok_cfg.write_text(json.dumps(data))
    return dest


def peak_growth(
    pid: int, request: pb.LogProbsRequest, stub: pb_grpc.ModelCacheStub
) -> tuple[int, pb.LogProbsResponse]:
    before = rss_bytes(pid)
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    response = stub.LogProbs(request, timeout=300)
    peak = int(proc_status(pid)["VmHWM"].split()[0]) * 1024
    return peak - before, response


@pytest.mark.slow
def test_a_4000_token_request_grows_the_daemon_by_at_most_1_5_gib(tmp_path: Path) -> None:
    source = long_llama(tmp_path / "llama-128k")
    config = {
        "models": [
            {"name": "big-vocab", "source": str(source), "task": "causal-lm", "max_length": 4096}
        ],
        "batching": {"max_batch_tokens": 8192},
    }
    ids = np.random.default_rng(0).integers(1000, 30000, TOKENS).tolist()
    with ServeProcess(config, tmp_path) as daemon:
        listing = daemon.wait_settled()
        assert listing.models[0].state == pb.ModelStatus.READY, listing.models[0].error
        with grpc.insecure_channel(daemon.address) as channel:
            stub = pb_grpc.ModelCacheStub(channel)  # type: ignore[no-untyped-call]
            opts = {"entropy": True, "expected_logprob": True, "top_k": 5}
            warm = pb.LogProbsRequest(
                model="big-vocab", token_ids=[pb.TokenIds(ids=ids[:64])], **opts
            )
            health = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
            check = health_pb2.HealthCheckRequest(service="big-vocab")
            wait_for(
                lambda: health.Check(check).status == health_pb2.HealthCheckResponse.SERVING,
                "big-vocab serving",
            )
            stub.LogProbs(warm, timeout=60)
            request = pb.LogProbsRequest(
                model="big-vocab", token_ids=[pb.TokenIds(ids=ids)], **opts
            )
            growth, response = peak_growth(daemon.pid, request, stub)
    seq = response.sequences[0]
    logprobs = np.frombuffer(seq.logprobs, "<f4")
    top = np.frombuffer(seq.top_k_logprobs, "<f4").reshape(-1, 5)
    assert seq.num_tokens == TOKENS and logprobs.shape == (TOKENS - 1,)
    assert np.isfinite(logprobs).all() and (top[:, 0] >= logprobs - 1e-5).all()
    print(f"RSS growth for {TOKENS} tokens x {VOCAB} vocabulary: {growth / GIB:.2f} GiB")
    assert growth <= 1.5 * GIB, f"the daemon grew by {growth / GIB:.2f} GiB"
