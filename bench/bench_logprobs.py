"""Log-prob benchmark: modelcache LogProbs over gRPC vs an in-process forward + log_softmax.

Prints a table (not a test). The model is GPT-2-small-sized (12 layers, 768 wide, 50257
vocabulary, random weights from a fixed seed) written with save_pretrained to a temporary
directory; the inputs are token-id windows of 64..192 tokens cut from the peerbench corpus
(tokenized with the bundled MiniLM tokenizer, which the model directory also carries).

- baseline: this process, requests in order, one padded [rows, T] forward per request,
  float32 log_softmax, gather of the observed tokens (the minimum any server must do);
- modelcache: the daemon in a subprocess, the same requests from ``--clients`` concurrent
  clients, with (a) log-probs only and (b) entropy + E/Var[log p] + rank + top-5 as well.

The three take turns on the same cores (the idle daemon costs nothing while the baseline
runs), in ``--rounds`` interleaved rounds; the table gives medians.
Wire bytes per token are measured on real responses: the server never sends [T, V]
logits, only per-position values (4 bytes each, top-k 8 bytes per alternative).

    .venv/bin/python bench/bench_logprobs.py [--sequences 32] [--clients 4] [--device cuda]

On CUDA both sides are float32 and the in-process baseline synchronises the device around
its clock (the server's responses are host bytes, so a served request is complete when it
returns).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import Daemon, MachineCpu, load_corpus, quiet


def build_model(dest: Path) -> None:
    import torch
    import transformers

    from modelcache.examples import bundled_minilm

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=50257,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        bos_token_id=101,
        eos_token_id=102,
    )
    transformers.GPT2LMHeadModel(cfg).save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (bundled_minilm() / name).is_file():
            shutil.copy(bundled_minilm() / name, dest / name)


def make_requests(n_seq: int, per_request: int) -> list[list[list[int]]]:
    from transformers import AutoTokenizer

    from modelcache.examples import bundled_minilm

    tok = AutoTokenizer.from_pretrained(str(bundled_minilm()))
    corpus, _ = load_corpus(2000, 1234)
    stream = [t for ids in tok(corpus, add_special_tokens=False)["input_ids"] for t in ids]
    rng = np.random.default_rng(0)
    seqs, pos = [], 0
    for _ in range(n_seq):
        n = int(rng.integers(64, 193))
        seqs.append(stream[pos : pos + n])
        pos += n
    return [seqs[i : i + per_request] for i in range(0, n_seq, per_request)]


def _sync(device: str) -> None:
    """Kernels on CUDA are asynchronous: a clock read without a sync times the launches."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def baseline(model: Any, requests: list[list[list[int]]], device: str = "cpu") -> float:
    import torch

    tokens = 0
    with torch.inference_mode():
        model(input_ids=torch.tensor([requests[0][0][:8]], device=device))  # warm-up
        _sync(device)
        start = time.perf_counter()
        for req in requests:
            width = max(map(len, req))
            ids = torch.zeros(len(req), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(req):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            observed = lp.gather(-1, ids[:, 1:, None])[..., 0].cpu()
            _ = [observed[row, : len(seq) - 1].numpy().tobytes() for row, seq in enumerate(req)]
            tokens += sum(map(len, req))
        _sync(device)
        return tokens / (time.perf_counter() - start)


async def served(
    address: str, requests: list[list[list[int]]], clients: int, stats: bool
) -> tuple[float, list[float]]:
    from modelcache.client import AsyncModelCacheClient

    flags: dict[str, Any] = (
        {"entropy": True, "expected_logprob": True, "rank": True, "top_k": 5} if stats else {}
    )
    queue = list(requests)
    latencies: list[float] = []
    async with AsyncModelCacheClient(address, timeout=600) as client:
        await client.logprobs("gpt2-small", token_ids=[requests[0][0][:8]], **flags)
        start = time.perf_counter()

        async def one_client() -> None:
            while queue:
                req = queue.pop(0)
                t = time.perf_counter()
                out = await client.logprobs("gpt2-small", token_ids=req, **flags)
                latencies.append(time.perf_counter() - t)
                assert [len(s.token_ids) for s in out] == [len(s) for s in req]

        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return sum(len(s) for r in requests for s in r) / elapsed, latencies


def wire_bytes(daemon: Daemon, seqs: list[list[int]]) -> list[tuple[str, float]]:
    from modelcache.v1 import modelcache_pb2 as pb

    out = []
    tokens = sum(map(len, seqs))
    for label, flags in (
        ("log-probs only", {}),
        ("+ entropy + E/Var[log p]", {"entropy": True, "expected_logprob": True}),
        (
            "+ entropy + E/Var + rank + top-5",
            {"entropy": True, "expected_logprob": True, "rank": True, "top_k": 5},
        ),
    ):
        req = pb.LogProbsRequest(
            model="gpt2-small", token_ids=[pb.TokenIds(ids=s) for s in seqs], **flags
        )
        out.append((label, daemon.stub().LogProbs(req, timeout=600).ByteSize() / tokens))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--per-request", type=int, default=4)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quiet-threshold", type=float, default=0.3)
    ap.add_argument("--quiet-wait", type=float, default=120.0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (daemon and baseline)")
    args = ap.parse_args()

    import torch
    import transformers

    requests = make_requests(args.sequences, args.per_request)
    n_tokens = sum(len(s) for r in requests for s in r)
    bases: list[float] = []
    rows: dict[bool, list[tuple[float, list[float], dict[str, float]]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="bench-logprobs-") as tmp:
        model_dir = Path(tmp) / "gpt2-small"
        build_model(model_dir)
        print(
            f"model: GPT-2-small shape (124M params, vocab 50257), random init; "
            f"{len(requests)} requests x {args.per_request} sequences, {n_tokens} tokens; "
            f"torch threads={torch.get_num_threads()} cores={os.cpu_count()} "
            f"device={args.device} (float32)"
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir))
        model = model.to(args.device).eval()
        config = {
            "models": [
                {
                    "name": "gpt2-small",
                    "source": str(model_dir),
                    "task": "causal-lm",
                    "max_length": 1024,
                    "device": args.device,
                    "dtype": "float32",
                }
            ]
        }
        with Daemon(config) as daemon:
            wire = wire_bytes(daemon, requests[0])
            # Rounds interleave the three measurements, so a slow drift in the machine's
            # background load hits them alike; the table shows medians over rounds.
            for _ in range(args.rounds):
                quiet([daemon.pid], args.quiet_threshold, args.quiet_wait)
                bases.append(baseline(model, requests, args.device))
                for stats in (False, True):
                    quiet([daemon.pid], args.quiet_threshold, args.quiet_wait)
                    cpu = MachineCpu(daemon.pid)
                    rate, lat = asyncio.run(served(daemon.address, requests, args.clients, stats))
                    rows[stats].append((rate, sorted(lat), cpu.stop()))
    base = statistics.median(bases)
    print(
        f"baseline (in-process forward + log_softmax + gather): median {base:.1f} tokens/s "
        f"over {len(bases)} rounds ({', '.join(f'{b:.1f}' for b in bases)})"
    )

    print(
        f"\n| modelcache ({args.clients} clients) | tokens/s | ratio vs baseline | "
        "p50 s | max s | bench CPU s | server CPU s | other cores |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for stats in (False, True):
        rate = statistics.median(r for r, _, _ in rows[stats])
        lat = sorted(x for _, ls, _ in rows[stats] for x in ls)
        usage = {k: statistics.median(u[k] for *_, u in rows[stats]) for k in rows[stats][0][2]}
        label = "all statistics + top-5" if stats else "log-probs only"
        flag = " !" if usage["other"] > 0.3 else ""
        print(
            f"| {label} | {rate:.1f} | {rate / base:.2f} | {lat[len(lat) // 2]:.2f} | "
            f"{lat[-1]:.2f} | {usage['bench_cpu']:.1f} | {usage['server_cpu']:.1f} | "
            f"{usage['other']:.2f}{flag} |"
        )
    print("\n| response contents | bytes per token on the wire |")
    print("|---|---:|")
    for label, per_token in wire:
        print(f"| {label} | {per_token:.1f} |")
    print("| (full float32 logits, for comparison; never sent) | 201028 |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
