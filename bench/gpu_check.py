"""GPU check (issue 12): one run, one JSON with sections load, correctness, serving, oom.

On a GPU machine (≤ 8 minutes): synthetic checkpoints generated on the spot (8B- and
1B-shaped Llama in bf16, GPT-2, a MiniLM-shaped BERT), their load figures (GB/s against a
warm raw read and a pinned host→device ceiling, host RSS peak), correctness against
transformers on the device (and bf16 vs float32 log-prob deltas), serving throughput over
gRPC against an in-process forward, a real CUDA OOM split and recovery. On a CPU,
``--device cpu --small`` runs the same checks on small shapes in a minute (``make test``
runs it: tests/test_gpu_check.py) so the script never rots.

The GPU machine of this project has Python 3.12, torch 2.11 (CUDA 13), transformers 5.17
and no network; the project pins Python 3.11, so it runs from the source tree with
PYTHONPATH, with the wheels of ``bench/gpu_wheels.txt`` carried (34 MiB; the one ``pip
download`` command is in that file's header, run where there is a network, from the
repository root, into ``wheels/``), then ``bash bench/gpu_check.sh`` (installs them into a
target directory, no network).

    python bench/gpu_check.py [--device cuda] [--small] [--out gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_parts as gp
import transformers

from modelcache.client import ModelCacheClient
from modelcache.config import BatchingConfig
from modelcache.daemon.batcher import Batcher
from modelcache.daemon.inference import EmbedItem, LogProbsItem, LogProbsOptions, ModelCompute
from modelcache.metrics import DAEMON_REGISTRY

STATS = LogProbsOptions(top_k=5, entropy=True, expected_logprob=True)


def token_batch(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1000, min(vocab, 30000), length).tolist() for _ in range(n)]


def check_load(shape: gp.Shape, path: Path, device: torch.device) -> tuple[Any, Any, dict]:
    size = gp.checkpoint_bytes(path)
    raw = gp.raw_read_gbps(path)
    with gp.PeakRss() as rss:
        start = time.perf_counter()
        registry, loaded = gp.load(shape, path, str(device))
        seconds = time.perf_counter() - start
    gbps = size / seconds / 1e9
    pinned = gp.pinned_host_bytes(device)  # the ring is handed back after the load
    ceiling = gp.h2d_ceiling_gbps(device)
    return (
        registry,
        loaded,
        {
            "bytes": size,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "seconds": round(seconds, 3),
            "gb_per_s": round(gbps, 2),
            "raw_read_gb_per_s": round(raw, 2),
            "vs_raw_read": round(gbps / raw, 3),
            "h2d_ceiling_gb_per_s": None if ceiling is None else round(ceiling, 2),
            "vs_h2d_ceiling": None if ceiling is None else round(gbps / ceiling, 3),
            "host_rss_peak_gib": round(rss.growth / gp.GIB, 3),
            "pinned_host_bytes_after": pinned,
            "stages": {k: round(v, 3) for k, v in loaded.stage_seconds.items()},
        },
    )


def reference_logprobs(model: Any, seqs: list[list[int]], device: torch.device) -> list[Any]:
    out = []
    with torch.inference_mode():
        for s in seqs:
            logits = model(input_ids=torch.tensor([s], device=device)).logits[0, :-1]
            lp = torch.log_softmax(logits.double(), -1)
            out.append(lp.gather(-1, torch.tensor(s[1:], device=device)[:, None])[:, 0].cpu())
    return out


def check_correctness(shape: gp.Shape, path: Path, loaded: Any, small: bool) -> dict:
    device, compute = loaded.device, ModelCompute(loaded)
    ref = transformers.AutoModelForCausalLM if shape.task == "causal-lm" else transformers.AutoModel
    exact = loaded.dtype == torch.float32
    tol = 1e-4 if exact else 0.15
    model = ref.from_pretrained(str(path), dtype=loaded.dtype).to(device).eval()
    if shape.task == "embedding":
        ids = token_batch(8, 16 if small else 128, shape.vocab)
        got = compute.run([EmbedItem(s, False) for s in ids])
        with torch.inference_mode():
            want = model(input_ids=torch.tensor(ids, device=device)).last_hidden_state
            want = want.float().mean(1).cpu().numpy()
        delta = float(np.abs(np.stack(got) - want).max())
        return {"max_abs_delta": delta, "tolerance": tol, "passed": delta <= tol}
    seqs = token_batch(4, 32 if small else 512, shape.vocab)
    got = compute.run([LogProbsItem(s, STATS) for s in seqs])
    want = reference_logprobs(model, seqs, device)
    delta = max(float(np.abs(g.logprobs - w.numpy()).max()) for g, w in zip(got, want, strict=True))
    result: dict[str, Any] = {
        "max_abs_delta": delta,
        "tolerance": tol,
        "passed": delta <= tol,
        "split_head": bool(compute.logprob_engine and compute.logprob_engine.split),
    }
    if not exact:  # the served half precision against float32 weights
        del model
        gp.free_device(device)
        f32 = ref.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
        full = reference_logprobs(f32, seqs, device)
        result["vs_float32_max_abs_delta"] = max(
            float(np.abs(g.logprobs - w.numpy()).max()) for g, w in zip(got, full, strict=True)
        )
        del f32
    gp.free_device(device)
    return result


def in_process_rate(loaded: Any, seqs: list[list[int]], task: str, rounds: int) -> float:
    """Tokens/s of the minimum any server must do: one padded forward per batch, plus
    float32 log_softmax + gather (causal) or mean pooling (embedding), results on host."""
    model, device = loaded.model, loaded.device
    ids = torch.tensor(seqs, device=device)
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(rounds):
            if task == "embedding":
                model(input_ids=ids).last_hidden_state.float().mean(1).cpu()
            else:
                lp = torch.log_softmax(
                    model(input_ids=ids, use_cache=False).logits[:, :-1], -1, dtype=torch.float32
                )
                lp.gather(-1, ids[:, 1:, None]).cpu()
                del lp
        gp.sync(device)
    return rounds * ids.numel() / (time.perf_counter() - start)


def check_serving(shape: gp.Shape, registry: Any, loaded: Any, small: bool) -> dict:
    rows, length = (8, 64) if small else ((256, 128) if shape.task == "embedding" else (16, 512))
    seqs = token_batch(rows, length, shape.vocab, seed=1)
    rounds = 2 if small else 5
    in_process_rate(loaded, seqs[:2], shape.task, 1)  # warm-up
    base = in_process_rate(loaded, seqs, shape.task, rounds)
    daemon = gp.InProcessDaemon(registry)
    try:
        with ModelCacheClient(daemon.address, timeout=600) as client:
            texts = [" ".join(["word"] * (length - 2))] * rows
            call = (
                (lambda: client.embed(shape.name, texts))
                if shape.task == "embedding"
                else (lambda: client.logprobs(shape.name, token_ids=seqs))
            )
            call()
            start = time.perf_counter()
            for _ in range(rounds):
                call()
            served = rounds * rows * length / (time.perf_counter() - start)
    finally:
        daemon.stop()
    return {
        "rows": rows,
        "tokens_per_row": length,
        "in_process_tokens_per_s": round(base, 1),
        "served_tokens_per_s": round(served, 1),
        "ratio": round(served / base, 3),
    }


def oom_count(model: str, outcome: str) -> float:
    labels = {"model": model, "outcome": outcome}
    return DAEMON_REGISTRY.get_sample_value("modelcache_batch_oom_total", labels) or 0.0


def check_oom(shape: gp.Shape, loaded: Any, small: bool) -> dict:
    """A batch that does not fit is split and answered exactly; memory returns to its
    baseline. On CUDA the limit is real (a per-process memory fraction just above what is
    allocated); on a CPU the OOM is injected above a token budget."""
    device, compute = loaded.device, ModelCompute(loaded)
    seqs = token_batch(16 if small else 64, 64 if small else 1024, shape.vocab, seed=2)
    items = [LogProbsItem(s, STATS) for s in seqs]
    want = compute.run(items[:1])
    hook = None
    if device.type == "cuda":
        gp.free_device(device)
        baseline = torch.cuda.memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (baseline + (2 << 30)) / total), device)
    else:
        baseline = 0
        budget = len(seqs[0]) * 4

        def limit(module: Any, args: Any) -> None:
            if args[0].numel() > budget:
                raise torch.OutOfMemoryError(f"injected: {args[0].numel()} tokens > {budget}")

        hook = loaded.model.get_input_embeddings().register_forward_pre_hook(limit)
    before = oom_count(shape.name, "split")
    batcher = Batcher(shape.name, "LogProbs", compute.run, BatchingConfig(max_batch_tokens=1 << 20))
    batcher.start()
    try:
        job = batcher.submit(items, [len(s) for s in seqs])
        got = job.future.result(600)
    finally:
        batcher.stop(30)
        if hook is not None:
            hook.remove()
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    gp.free_device(device)
    after = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    delta = float(np.abs(got[0].logprobs - want[0].logprobs).max())
    splits = oom_count(shape.name, "split") - before
    return {
        "injected": device.type != "cuda",
        "sequences": len(seqs),
        "splits": splits,
        "answered": len(got) == len(seqs),
        "max_abs_delta_vs_unsplit": delta,
        "allocated_above_baseline_bytes": after - baseline,
        # (cuBLAS keeps a workspace per stream in the caching allocator: a few MiB.)
        "passed": splits > 0
        and len(got) == len(seqs)
        and delta <= 1e-3
        and after - baseline <= 64 << 20,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="small shapes (CPU, make test)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    shapes = gp.SMALL if args.small else gp.FULL
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "small": args.small,
        "load": {},
        "correctness": {},
        "serving": {},
        "oom": {},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for shape in shapes:
            ckpt_dtype = dtype if shape.kind == "llama" else torch.float32
            path = gp.write_checkpoint(shape, Path(tmp) / shape.name, ckpt_dtype, device)
            registry, loaded, figures = check_load(shape, path, device)
            report["load"][shape.name] = figures
            report["correctness"][shape.name] = check_correctness(shape, path, loaded, args.small)
            if shape.name in ("llama-1b", "minilm"):
                report["serving"][shape.name] = check_serving(shape, registry, loaded, args.small)
            if shape.name == "llama-1b":
                report["oom"][shape.name] = check_oom(shape, loaded, args.small)
            del registry, loaded
            gp.free_device(device)
            for f in path.glob("*.safetensors"):
                f.unlink()
            print(f"{shape.name}: done at {time.perf_counter() - started:.0f}s", flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["passed"] = all(c["passed"] for c in report["correctness"].values()) and all(
        o["passed"] for o in report["oom"].values()
    )
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
