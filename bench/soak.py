"""Soak (issue #6): N concurrent clients mixing Embed and LogProbs over two models against a
``modelcache serve`` child process on loopback, for a bounded time and request count.

    .venv/bin/python bench/soak.py [--seconds 600] [--clients 64] [--warmup 30] [--json F]

Models: the bundled all-MiniLM-L6-v2 (``minilm``, embedding) and a small GPT-2 with the
same 30522-token vocabulary (``gpt2``, causal-lm), built once under
$MODELCACHE_BENCH_CACHE (default ~/.cache/modelcache-bench).

Every client is an asyncio task (spread over 4 channels) that sends its next request as
soon as the previous one is answered: Embed of 1-4 sentences, or LogProbs of 1-2
sentences, some with top-k/entropy/rank. Each answer is compared with the answer the same
sentence got alone before the soak (cosine >= 0.9999 / log-probs within 1e-3), so a wrong
result counts as an error, like a status other than OK (the client does not retry).

Measured after ``--warmup`` seconds of the same load (thread pools filled, allocator arenas
grown), until ``--seconds`` later or ``--max-requests``: throughput, p50/p99 latency per
RPC, errors by code, the daemon's RSS and thread count (/proc/<pid>/status) at the start
and end of the window (idle: the clients are held until nothing is in flight) and under
load, and the daemon's own request counters (modelcache_requests_total) against the
client's count. Exit status 1 when any request failed, the counts differ, or idle
RSS/threads grew by --max-growth (default 5 %) or more.

Allocator: by default the daemon runs with glibc's mmap and trim thresholds fixed at
128 KiB (``--allocator fixed``), so that its RSS follows the memory it actually holds.
With glibc's dynamic threshold (``--allocator glibc``, the product default) the idle RSS
of the same daemon under the same load swung between 661 and 878 MiB from one 5-s pause
to the next (75 s measured), following the size of the last tensors freed; fixed, it
stayed within 577..583 MiB. A leak shows either way; only the fixed one is a stable
enough baseline for a 5 % bound.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import grpc
import numpy as np
import tiny_models
from daemon_process import ServeProcess, rss_bytes, thread_count

from modelcache.examples import bundled_minilm
from modelcache.v1 import modelcache_pb2 as pb
from modelcache.v1 import modelcache_pb2_grpc as pb_grpc

CHANNELS = 4
WORDS = [
    "model",
    "cache",
    "loads",
    "every",
    "weight",
    "once",
    "and",
    "serves",
    "embeddings",
    "with",
    "log",
    "probs",
    "to",
    "many",
    "training",
    "pods",
    "over",
    "loopback",
    "while",
    "the",
    "queue",
    "stays",
    "bounded",
    "nothing",
    "leaks",
    "at",
    "all",
    "ünïcödé",
    "🙂",
]


def corpus(n: int, seed: int = 6) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(n)]


def build_lm() -> Path:
    root = Path(os.environ.get("MODELCACHE_BENCH_CACHE", Path.home() / ".cache/modelcache-bench"))
    path = root / "soak-gpt2-2x64"
    if not (path / "model.safetensors").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".soak-gpt2-", dir=root if root.is_dir() else None))
        tiny_models.gpt2(tmp / "m")
        root.mkdir(parents=True, exist_ok=True)
        (tmp / "m").rename(path)
    return path


def nearest_rank(values: list[float], pct: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(pct / 100 * len(s)) - 1)] if s else math.nan


class Soak:
    def __init__(self, daemon: ServeProcess, args: argparse.Namespace) -> None:
        self.daemon, self.args = daemon, args
        self.texts = corpus(64)
        self.ref_embed: dict[str, np.ndarray[Any, Any]] = {}
        self.ref_lp: dict[str, np.ndarray[Any, Any]] = {}
        self.lat: dict[str, list[float]] = collections.defaultdict(list)
        self.codes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.wrong: list[str] = []
        self.sequences = 0
        self.ok_total = 0
        self.measuring = False
        self.stop_at = math.inf
        self.budget = args.max_requests
        self.go = asyncio.Event()
        self.stopped = False
        self.inflight = 0
        self.samples: list[tuple[float, int, int]] = []

    async def references(self, stub: Any) -> None:
        """Each sentence alone, before any load."""
        for t in self.texts:
            r = await stub.Embed(pb.EmbedRequest(model="minilm", inputs=[t]), timeout=60)
            self.ref_embed[t] = np.frombuffer(r.embeddings, "<f4")
            r = await stub.LogProbs(pb.LogProbsRequest(model="gpt2", inputs=[t]), timeout=60)
            self.ref_lp[t] = np.frombuffer(r.sequences[0].logprobs, "<f4")

    def check(self, method: str, texts: list[str], resp: Any) -> str:
        if method == "Embed":
            emb = np.frombuffer(resp.embeddings, "<f4").reshape(resp.rows, resp.dims)
            if emb.shape != (len(texts), 384):
                return f"Embed shape {emb.shape}"
            for row, t in zip(emb, texts, strict=True):
                ref = self.ref_embed[t]
                cos = float(row @ ref / np.linalg.norm(row) / np.linalg.norm(ref))
                if not cos >= 0.9999:
                    return f"Embed cosine {cos:.6f} for {t[:40]!r}"
            return ""
        if len(resp.sequences) != len(texts):
            return f"LogProbs {len(resp.sequences)} sequences for {len(texts)} inputs"
        for s, t in zip(resp.sequences, texts, strict=True):
            lp = np.frombuffer(s.logprobs, "<f4")
            ref = self.ref_lp[t]
            if lp.shape != ref.shape or not np.allclose(lp, ref, atol=1e-3):
                return f"LogProbs differ for {t[:40]!r}"
        return ""

    async def client(self, stub: Any, seed: int) -> None:
        rng = random.Random(seed)
        while True:
            await self.go.wait()
            if self.stopped:
                return
            if self.measuring and self.budget is not None:
                if self.budget <= 0:
                    self.stop_at = time.monotonic()
                    await asyncio.sleep(0.05)
                    continue
                self.budget -= 1
            if rng.random() < 0.5:
                method, texts = "Embed", rng.sample(self.texts, rng.randint(1, 4))
                call, req = stub.Embed, pb.EmbedRequest(model="minilm", inputs=texts)
            else:
                method, texts = "LogProbs", rng.sample(self.texts, rng.randint(1, 2))
                extra = rng.random() < 0.3
                call, req = (
                    stub.LogProbs,
                    pb.LogProbsRequest(
                        model="gpt2",
                        inputs=texts,
                        top_k=5 if extra else 0,
                        entropy=extra,
                        rank=extra,
                    ),
                )
            measured = self.measuring
            self.inflight += 1
            started = time.perf_counter()
            try:
                resp = await call(req, timeout=self.args.timeout)
                code = "OK"
            except grpc.RpcError as exc:
                code, resp = exc.code().name, None
            finally:
                self.inflight -= 1
            elapsed = time.perf_counter() - started
            if resp is not None and (problem := self.check(method, texts, resp)):
                code = "WRONG_RESULT"
                self.wrong.append(problem)
            self.ok_total += code == "OK"
            if measured and self.measuring:
                self.codes[(method, code)] += 1
                self.lat[method].append(elapsed)
                self.sequences += len(texts) if code == "OK" else 0
            elif code != "OK":  # errors outside the window count too
                self.codes[(method, code)] += 1

    def sample(self) -> tuple[float, int, int]:
        row = (time.monotonic(), rss_bytes(self.daemon.pid), thread_count(self.daemon.pid))
        self.samples.append(row)
        return row

    async def quiesce(self) -> tuple[float, int, int]:
        """Hold the clients, let every request in flight finish, sample the idle daemon."""
        self.go.clear()
        while self.inflight:
            await asyncio.sleep(0.01)
        return self.sample()

    async def fill_pools(self, stub: Any) -> None:
        """Bursts far wider than the clients, so the daemon's lazily grown thread pools
        (tokenization executor, gRPC) reach their size during the warm-up."""
        texts = ["fill the pools"]
        for _ in range(3):
            calls = [
                stub.Embed(
                    pb.EmbedRequest(model="minilm", inputs=texts, truncate=True),
                    timeout=self.args.timeout,
                )
                for _ in range(256)
            ]
            self.inflight += len(calls)
            try:
                for resp in await asyncio.gather(*calls):
                    assert resp.rows == 1
                    self.ok_total += 1
            finally:
                self.inflight -= len(calls)

    async def run(self) -> dict[str, Any]:
        a = self.args
        channels = [grpc.aio.insecure_channel(self.daemon.address) for _ in range(CHANNELS)]
        stubs = [pb_grpc.ModelCacheStub(c) for c in channels]  # type: ignore[no-untyped-call]
        self.go.set()
        tasks: list[asyncio.Future[None]] = []
        try:
            await self.references(stubs[0])
            served_before = self.daemon.metric("modelcache_requests_total", code="OK")
            tasks = [
                asyncio.ensure_future(self.client(stubs[i % CHANNELS], i)) for i in range(a.clients)
            ]
            warm_until = time.monotonic() + a.warmup
            await self.fill_pools(stubs[0])
            # Warm-up: at least --warmup s, then until the thread count held for 5 s.
            last_change, threads = time.monotonic(), thread_count(self.daemon.pid)
            while (now := time.monotonic()) < warm_until or (
                now - last_change < 5.0 and now < warm_until + 2 * a.warmup
            ):
                await asyncio.sleep(0.5)
                if (t := thread_count(self.daemon.pid)) != threads:
                    last_change, threads = time.monotonic(), t
            served_warm = self.daemon.metric("modelcache_requests_total", code="OK")
            t0, rss0, thr0 = await self.quiesce()
            self.stop_at = t0 + a.seconds
            self.measuring = True
            self.go.set()
            while time.monotonic() < self.stop_at:
                await asyncio.sleep(min(1.0, max(0.0, self.stop_at - time.monotonic())))
                self.sample()
            self.measuring = False
            t1, rss1, thr1 = await self.quiesce()
            self.stopped = True
            self.go.set()
            await asyncio.gather(*tasks)
            served_after = self.daemon.metric("modelcache_requests_total", code="OK")
        finally:
            self.stopped = True
            self.go.set()
            for t in tasks:
                t.cancel()
            for c in channels:
                await c.close()
        loaded = [(r, n) for t, r, n in self.samples if t0 < t < t1]
        ok = sum(n for (_, code), n in self.codes.items() if code == "OK")
        requests = sum(n for (_, code), n in self.codes.items())
        window = t1 - t0
        per_method = {
            m: {
                "requests": len(v),
                "p50_ms": nearest_rank(v, 50) * 1e3,
                "p99_ms": nearest_rank(v, 99) * 1e3,
                "max_ms": max(v) * 1e3,
            }
            for m, v in sorted(self.lat.items())
        }
        errors = {f"{m}:{c}": n for (m, c), n in sorted(self.codes.items()) if c != "OK"}
        return {
            "clients": a.clients,
            "seconds": round(window, 1),
            "warmup": round(t0 - (warm_until - a.warmup), 1),
            "requests": requests,
            "ok": ok,
            "errors": errors,
            "wrong": self.wrong[:5],
            "requests_per_s": ok / window,
            "sequences_per_s": self.sequences / window,
            "latency": per_method,
            # idle (no request in flight) at the start and the end of the window
            "rss_start": rss0,
            "rss_end": rss1,
            "rss_growth": rss1 / rss0 - 1,
            "rss_loaded_min": min((r for r, _ in loaded), default=rss0),
            "rss_loaded_max": max((r for r, _ in loaded), default=rss0),
            "threads_start": thr0,
            "threads_end": thr1,
            "thread_growth": thr1 / thr0 - 1,
            "threads_peak": max((n for _, n in loaded), default=thr0),
            # every OK the clients saw (warm-up, window) was counted by the daemon, once
            "daemon_ok": int(served_after - served_before),
            "client_ok": self.ok_total,
            "daemon_ok_window": int(served_after - served_warm),
            "pid": self.daemon.pid,
        }


def table(r: dict[str, Any]) -> str:
    mb = 1 / 2**20
    lines = [
        f"soak: {r['clients']} clients, {r['seconds']} s measured after {r['warmup']} s "
        f"warm-up (daemon pid {r['pid']}, allocator {r['allocator']})",
        "",
        "| RPC | requests | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for m, v in r["latency"].items():
        lines.append(
            f"| {m} | {v['requests']} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | {v['max_ms']:.1f} |"
        )
    lines += [
        "",
        f"throughput: {r['requests_per_s']:.1f} requests/s, {r['sequences_per_s']:.1f} "
        f"sequences/s; errors: {r['errors'] or 0}",
        f"daemon RSS, idle at start -> end of the window: {r['rss_start'] * mb:.1f} MiB -> "
        f"{r['rss_end'] * mb:.1f} MiB ({100 * r['rss_growth']:+.2f} %); under load "
        f"{r['rss_loaded_min'] * mb:.1f}..{r['rss_loaded_max'] * mb:.1f} MiB",
        f"daemon threads: {r['threads_start']} -> {r['threads_end']} "
        f"({100 * r['thread_growth']:+.2f} %), peak {r['threads_peak']}",
        f"daemon counted {int(r['daemon_ok'])} OK requests (the clients: {r['client_ok']})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--warmup", type=float, default=30.0)
    ap.add_argument(
        "--max-requests",
        type=int,
        default=None,
        help="stop the measured window after this many requests",
    )
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request deadline")
    ap.add_argument("--max-growth", type=float, default=0.05)
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    ap.add_argument(
        "--allocator",
        choices=["fixed", "glibc"],
        default="fixed",
        help="glibc malloc thresholds of the daemon (see the module docstring)",
    )
    args = ap.parse_args(argv)
    env = (
        {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
        if args.allocator == "fixed"
        else {}
    )

    config = {
        "models": [
            {
                "name": "minilm",
                "source": str(bundled_minilm()),
                "task": "embedding",
                "max_length": 256,
            },
            {"name": "gpt2", "source": str(build_lm()), "task": "causal-lm"},
        ]
    }
    with tempfile.TemporaryDirectory(prefix="modelcache-soak-") as tmp:
        daemon = ServeProcess(config, Path(tmp), name="soak", env=env)
        with daemon:
            daemon.wait_settled()
            soak = Soak(daemon, args)
            result = asyncio.run(soak.run())
            result["allocator"] = args.allocator
            alive = daemon.alive()
        result["daemon_alive"] = alive
        result["daemon_log_tracebacks"] = daemon.log().count("Traceback")
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    bad = (
        result["errors"]
        or not alive
        or result["rss_growth"] >= args.max_growth
        or result["thread_growth"] >= args.max_growth
        or result["daemon_ok"] != result["client_ok"]
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
