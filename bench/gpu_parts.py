"""Pieces of bench/gpu_check.py: synthetic checkpoints, memory and bandwidth probes, and an
in-process daemon. Kept apart so that gpu_check.py reads as the list of checks it runs."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import tiny_models  # noqa: E402

from modelcache.config import parse_config  # noqa: E402
from modelcache.daemon import hostmem  # noqa: E402
from modelcache.daemon.registry import ModelRegistry  # noqa: E402
from modelcache.daemon.server import DaemonServer  # noqa: E402
from modelcache.settings import DaemonSettings  # noqa: E402

GIB = 1 << 30


@dataclass(frozen=True)
class Shape:
    """One synthetic checkpoint: architecture, sizes, and the task it is served for."""

    name: str
    kind: str  # llama | gpt2 | bert
    task: str
    width: int
    layers: int
    vocab: int
    heads: int = 4
    kv_heads: int = 4
    inter: int = 0
    tied: bool = False


FULL = [
    Shape("llama-8b", "llama", "causal-lm", 4096, 32, 128_256, 32, 8, 14336),
    Shape("llama-1b", "llama", "causal-lm", 2048, 16, 128_256, 32, 8, 8192, tied=True),
    Shape("gpt2", "gpt2", "causal-lm", 768, 12, 50257, 12),
    Shape("minilm", "bert", "embedding", 384, 6, 30522, 12, inter=1536),
]
SMALL = [
    Shape("llama-8b", "llama", "causal-lm", 128, 2, 128_256, 4, 2, 256),
    Shape("llama-1b", "llama", "causal-lm", 64, 2, 32000, 4, 2, 128, tied=True),
    Shape("gpt2", "gpt2", "causal-lm", 64, 2, 30522, 4),
    Shape("minilm", "bert", "embedding", 64, 2, 30522, 4, inter=128),
]


def config_of(s: Shape) -> Any:
    if s.kind == "llama":
        return transformers.LlamaConfig(
            vocab_size=s.vocab,
            hidden_size=s.width,
            intermediate_size=s.inter,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            num_key_value_heads=s.kv_heads,
            max_position_embeddings=4096,
            tie_word_embeddings=s.tied,
            bos_token_id=101,
            eos_token_id=102,
            pad_token_id=0,
        )
    if s.kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=s.vocab, n_positions=1024, n_embd=s.width, n_layer=s.layers, n_head=s.heads
        )
    return transformers.BertConfig(
        vocab_size=s.vocab,
        hidden_size=s.width,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        intermediate_size=s.inter,
        max_position_embeddings=512,
    )


def write_checkpoint(s: Shape, dest: Path, dtype: torch.dtype, device: torch.device) -> Path:
    """Random weights (fixed seed), initialised on ``device`` (seconds for 8B on a GPU),
    saved in ``dtype`` with the bundled WordPiece tokenizer."""
    torch.manual_seed(0)
    cls: Any = transformers.BertModel if s.kind == "bert" else transformers.AutoModelForCausalLM
    with torch.device(device):
        model = (
            cls._from_config(config_of(s), dtype=dtype)
            if s.kind == "bert"
            else (cls.from_config(config_of(s), dtype=dtype))
        )
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, max_shard_size="4GB")
    del model
    tiny_models.copy_tokenizer(dest)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dest


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def raw_read_gbps(path: Path) -> float:
    """A warm sequential read of the weight files (second of two reads), GB/s."""
    buf = bytearray(64 << 20)
    best = 0.0
    for _ in range(2):
        start, total = time.perf_counter(), 0
        for f in sorted(path.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    total += n
        best = max(best, total / (time.perf_counter() - start) / 1e9)
    return best


def pinned_host_bytes(device: torch.device) -> int | None:
    """Pinned host memory torch's caching host allocator holds (in use + cached)."""
    stats_of = getattr(torch.cuda, "host_memory_stats", None)  # torch >= 2.8
    if device.type != "cuda" or stats_of is None:
        return None
    stats = stats_of()
    value = stats.get("allocated_bytes.current", stats.get("reserved_bytes.current"))
    return None if value is None else int(value)


def h2d_ceiling_gbps(device: torch.device, size: int = GIB) -> float | None:
    """Pinned host → device copy of 1 GiB, GB/s: what any CUDA load could reach."""
    if device.type != "cuda":
        return None
    host = torch.empty(size, dtype=torch.uint8).pin_memory()
    dev = torch.empty(size, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(3):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    rate = 3 * size / (time.perf_counter() - start) / 1e9
    del host, dev
    hostmem.release_pinned()  # so the next load's pinned figure counts the load alone
    return rate


def copy_ceiling_gbps(device: torch.device, size: int = 256 << 20) -> float:
    """The bulk-copy ceiling of a load onto ``device``, GB/s: a pinned host→device copy on
    CUDA (see h2d_ceiling_gbps), a memcpy between two touched host buffers on CPU (what
    copying a read buffer into parameters costs at best)."""
    if device.type == "cuda":
        return h2d_ceiling_gbps(device) or 0.0
    src, dst = torch.ones(size, dtype=torch.uint8), torch.zeros(size, dtype=torch.uint8)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    return 5 * size / (time.perf_counter() - start) / 1e9


class PeakRss:
    """Host RSS peak of this process over a block, above its RSS at the start (VmHWM is
    reset through /proc/self/clear_refs)."""

    def __enter__(self) -> PeakRss:
        self.before = self._kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = (self._kb("VmHWM") - self.before) * 1024

    @staticmethod
    def _kb(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0


def load(s: Shape, path: Path, device: str, dtype: str = "auto") -> tuple[ModelRegistry, Any]:
    spec = {"name": s.name, "source": str(path), "task": s.task, "device": device}
    spec |= {"dtype": dtype, "max_length": 1024}
    registry = ModelRegistry(parse_config({"models": [spec]}))
    registry.prepare()
    registry.load_all()
    registry.close()
    entry = registry.entry(s.name)
    if entry.loaded is None:
        raise RuntimeError(f"{s.name} failed to load: {entry.error}")
    return registry, entry.loaded


class InProcessDaemon:
    """The product's DaemonServer on a background event loop (as tests/serving_fixtures)."""

    def __init__(self, registry: ModelRegistry) -> None:
        settings = DaemonSettings(host="127.0.0.1", port=0, metrics_port=0, grpc_threads=4)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = DaemonServer(registry.config, settings, registry)
        port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(60)
        self.address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while len(self.server.servicer.served()) < len(registry.names()):
            if time.monotonic() > deadline:
                raise TimeoutError("the model never became servable")
            time.sleep(0.01)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(1.0), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
