"""Load benchmark (issues #2, #12): modelcache's loads against the two ceilings any load
has — a warm raw read of the same files and a bulk copy to the device (a pinned
host→device copy on CUDA, a memcpy on CPU) — with the host RSS peak of each, side by side.

    .venv/bin/python bench/bench_load.py [--device cpu|cuda] [--dtype auto|float32|...]
                                         [--size-mb 500] [--repeats 3] [--ckpt-dtype float32]

Both load paths run on either device: ``whole`` (every shard read into owned memory, then
assigned; the CPU default) and ``streaming`` (a ring of buffers into parameters allocated
on the device; the CUDA default). The model (GPT-2 architecture, random weights) is
written once to $MODELCACHE_BENCH_CACHE (default ~/.cache/modelcache-bench). Caches are
warm: every timing follows an untimed read, so this measures memory bandwidth and CPU
work, not the disk. GB/s are checkpoint bytes over seconds. Also: 64 concurrent callers vs
one (one load), and transformers' from_pretrained (CPU weights mmapped: most bytes are not
read during its "load").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_parts as gp
import tiny_models

from modelcache.config import parse_config
from modelcache.daemon.registry import ModelRegistry

PATHS = ("whole", "streaming")


def build(size_mb: int, dtype: str) -> Path:
    root = Path(os.environ.get("MODELCACHE_BENCH_CACHE", Path.home() / ".cache/modelcache-bench"))
    width, item = 1024, getattr(torch, dtype).itemsize
    per_layer = 12 * width * width * item
    layers = max(1, round((size_mb * 2**20 - tiny_models.VOCAB * width * item) / per_layer))
    path = root / (f"gpt2-{width}x{layers}" + ("" if dtype == "float32" else f"-{dtype}"))
    if not (path / "model.safetensors").is_file():
        print(f"building {path} ...", file=sys.stderr)
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(
            vocab_size=tiny_models.VOCAB,
            n_positions=512,
            n_embd=width,
            n_layer=layers,
            n_head=16,
            bos_token_id=101,
            eos_token_id=102,
        )
        path.mkdir(parents=True, exist_ok=True)
        transformers.GPT2LMHeadModel(cfg).to(getattr(torch, dtype)).save_pretrained(path)
        tiny_models.copy_tokenizer(path)
    return path


def raw_read(path: Path) -> float:
    started = time.perf_counter()
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb", buffering=0) as fh:
            # The same uninitialised torch buffer modelcache reads into: the fairest floor.
            buf = torch.empty(f.stat().st_size, dtype=torch.uint8)
            fh.readinto(memoryview(buf.numpy()))
    return time.perf_counter() - started


def modelcache_load(
    path: Path, device: str, dtype: str, mode: str, callers: int = 1
) -> tuple[dict[str, float], float, int, int]:
    """(stages, wall seconds, loads, host RSS peak growth in bytes) of one load."""
    os.environ.pop("MODELCACHE_STREAMING_LOAD", None)
    if mode in PATHS:
        os.environ["MODELCACHE_STREAMING_LOAD"] = "1" if mode == "streaming" else "0"
    spec = {"name": "bench", "source": str(path), "task": "causal-lm", "device": device}
    registry = ModelRegistry(parse_config({"models": [spec | {"dtype": dtype}]}))
    registry.prepare()
    barrier = threading.Barrier(callers)

    def call() -> None:
        barrier.wait()
        registry.get("bench")

    threads = [threading.Thread(target=call) for _ in range(callers)]
    with gp.PeakRss() as rss:
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
    entry = registry.entry("bench")
    if entry.loaded is None:
        raise SystemExit(f"load failed: {entry.error}")
    stages, loads = dict(entry.stage_seconds), registry.load_count["bench"]
    registry.close()
    del entry
    gp.free_device(torch.device(device))
    return stages, wall, loads, rss.growth


def hf_load(path: Path, device: str) -> float:
    started = time.perf_counter()
    kw = {"device_map": device} if device != "cpu" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kw)
    gp.sync(torch.device(device))
    elapsed = time.perf_counter() - started
    del model
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--ckpt-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--size-mb", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-callers", action="store_true", help="skip the 64-callers table")
    args = ap.parse_args()
    path = build(args.size_mb, args.ckpt_dtype)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    device = torch.device(args.device)
    raw_read(path)  # warm the page cache
    ceiling = gp.copy_ceiling_gbps(device)
    reads: list[float] = []
    loads: dict[str, list[tuple[dict[str, float], int]]] = {m: [] for m in PATHS}
    hf, walls1, walls64 = [], [], []
    for _ in range(args.repeats):  # interleaved, so drift hits every column alike
        reads.append(raw_read(path))
        for mode in PATHS:
            stages, _, _, peak = modelcache_load(path, args.device, args.dtype, mode)
            loads[mode].append((stages, peak))
        if not args.no_callers:
            _, wall, _, _ = modelcache_load(path, args.device, args.dtype, "default")
            walls1.append(wall)
            _, wall64, n, _ = modelcache_load(path, args.device, args.dtype, "default", 64)
            assert n == 1, f"64 callers caused {n} loads"
            walls64.append(wall64)
        hf.append(hf_load(path, args.device))
    raw = statistics.median(reads)
    gbps = size / raw / 1e9
    print(
        f"\nmodel: {path.name}, {size / 2**20:.0f} MiB {args.ckpt_dtype} safetensors -> "
        f"{args.device} {args.dtype}; {args.repeats} interleaved repeats, medians; "
        f"torch threads {torch.get_num_threads()}"
    )
    label = "pinned host->device copy" if device.type == "cuda" else "memcpy (torch copy_)"
    print(
        f"ceilings: warm raw read {gbps:.2f} GB/s, {label} {ceiling:.2f} GB/s, "
        f"checkpoint {size / 2**30:.2f} GiB"
    )
    print(
        f"\n{'':<30}{'seconds':>9}{'GB/s':>8}{'x raw read':>12}{'x copy ceil.':>14}"
        f"{'RSS peak GiB':>14}"
    )
    print(
        f"{'raw read (warm)':<30}{raw:>9.3f}{gbps:>8.2f}{1:>12.2f}{gbps / ceiling:>14.2f}{'':>14}"
    )
    for mode in PATHS:
        peak = statistics.median(p for _, p in loads[mode]) / 2**30
        for stage in ("read", "materialize", "verify", "warmup", "total"):
            s = statistics.median(st[stage] for st, _ in loads[mode])
            rate = size / s / 1e9
            extra = f"{peak:>14.2f}" if stage == "total" else ""
            print(
                f"{mode + ' ' + stage:<30}{s:>9.3f}{rate:>8.2f}{rate / gbps:>12.2f}"
                f"{rate / ceiling:>14.2f}{extra}"
            )
    h = statistics.median(hf)
    rate = size / h / 1e9
    print(
        f"{'transformers from_pretrained':<30}{h:>9.3f}{rate:>8.2f}{rate / gbps:>12.2f}"
        f"{rate / ceiling:>14.2f}  (mmapped on CPU, see docstring)"
    )
    if walls1:
        w1, w64 = statistics.median(walls1), statistics.median(walls64)
        print(f"\n{'callers (default path)':<30}{'wall s':>9}{'x one':>8}{'loads':>8}")
        print(f"{'1':<30}{w1:>9.3f}{1:>8.2f}{1:>8}")
        print(f"{'64 concurrent':<30}{w64:>9.3f}{w64 / w1:>8.2f}{1:>8}")


if __name__ == "__main__":
    main()
