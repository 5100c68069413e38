"""Load-time benchmark (issue #2): modelcache's load stages vs a raw sequential read of
the same weight files, and 64 concurrent callers vs one — in one run, as ratios.

    .venv/bin/python bench/bench_load.py [--size-mb 500] [--repeats 3]

The model (GPT-2 architecture, random weights, ~500 MB in float32) is written once to
$MODELCACHE_BENCH_CACHE (default ~/.cache/modelcache-bench) and reused. Caches are warm:
every timing is preceded by one untimed read, so the comparison is memory bandwidth and
CPU work, not the disk. transformers' own from_pretrained is timed as a second reference
(it keeps CPU weights mmapped, so its "load" does not read most bytes until first use).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny_models

from modelcache.config import parse_config
from modelcache.daemon.registry import ModelRegistry


def build(size_mb: int) -> Path:
    root = Path(os.environ.get("MODELCACHE_BENCH_CACHE", Path.home() / ".cache/modelcache-bench"))
    width = 1024
    per_layer = 12 * width * width * 4
    layers = max(1, round((size_mb * 2**20 - tiny_models.VOCAB * width * 4) / per_layer))
    path = root / f"gpt2-{width}x{layers}"
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
        transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
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


def modelcache_load(path: Path, callers: int = 1) -> tuple[dict[str, float], float, int]:
    registry = ModelRegistry(
        parse_config({"models": [{"name": "bench", "source": str(path), "task": "causal-lm"}]})
    )
    registry.prepare()
    barrier = threading.Barrier(callers)
    started = time.perf_counter()

    def call() -> None:
        barrier.wait()
        registry.get("bench")

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    stages = dict(registry.entry("bench").stage_seconds)
    loads = registry.load_count["bench"]
    registry.close()
    return stages, wall, loads


def hf_load(path: Path) -> float:
    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    elapsed = time.perf_counter() - started
    del model
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    path = build(args.size_mb)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    raw_read(path)  # warm the page cache
    reads, loads, hf, walls1, walls64 = [], [], [], [], []
    for _ in range(args.repeats):  # interleaved, so drift hits every column alike
        reads.append(raw_read(path))
        stages, wall, _ = modelcache_load(path)
        loads.append(stages)
        walls1.append(wall)
        _, wall64, n = modelcache_load(path, callers=64)
        assert n == 1, f"64 callers caused {n} loads"
        walls64.append(wall64)
        hf.append(hf_load(path))
    raw = statistics.median(reads)
    print(
        f"\nmodel: {path.name}, {size / 2**20:.0f} MiB float32 safetensors, "
        f"{args.repeats} interleaved repeats, medians, torch threads {torch.get_num_threads()}"
    )
    print(f"{'stage':<28}{'seconds':>10}{'x raw read':>12}")
    print(f"{'raw sequential read':<28}{raw:>10.3f}{1:>12.2f}")
    for stage in ("resolve", "read", "materialize", "verify", "warmup", "total"):
        s = statistics.median(st[stage] for st in loads)
        print(f"{'modelcache ' + stage:<28}{s:>10.3f}{s / raw:>12.2f}")
    h = statistics.median(hf)
    label = "transformers from_pretrained"
    print(f"{label:<28}{h:>10.3f}{h / raw:>12.2f}  (mmapped, see docstring)")
    w1, w64 = statistics.median(walls1), statistics.median(walls64)
    print(f"\n{'callers':<28}{'wall s':>10}{'x one':>12}{'loads':>8}")
    print(f"{'1':<28}{w1:>10.3f}{1:>12.2f}{1:>8}")
    print(f"{'64 concurrent':<28}{w64:>10.3f}{w64 / w1:>12.2f}{1:>8}")
    print(
        f"\nread throughput: {size / raw / 2**30:.2f} GiB/s raw, "
        f"{size / statistics.median(st['read'] for st in loads) / 2**30:.2f} GiB/s modelcache"
    )


if __name__ == "__main__":
    main()
