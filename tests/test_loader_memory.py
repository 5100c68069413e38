"""Memory bounds of a load (issue 12): host RSS of a streaming load is the model plus the
ring, not the checkpoint; a model that does not fit in free device or host memory (probe,
MemAvailable, cgroup limit) fails fast as ``out_of_memory`` naming the bytes, never a
SIGKILL halfway through a read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tiny_models
import torch
import transformers
from loader_helpers import load_one

from modelcache.daemon import hostmem, loader, streaming
from modelcache.daemon.registry import ModelState
from modelcache.daemon.weights import read_header

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20

PROBE = r"""
import gc, json, os, sys
from modelcache.config import parse_config
from modelcache.daemon.loader import load_model
from modelcache.daemon.resolve import prepare_model
def kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
cfg = parse_config({"models": [{"name": "m", "source": sys.argv[1], "task": "causal-lm",
                                "dtype": "bfloat16"}]})
prepared = prepare_model(cfg.models[0], cfg)
for f in os.listdir(sys.argv[1]):  # warm page cache: measure memory, not the disk
    open(os.path.join(sys.argv[1], f), "rb").read()
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before, reset = kb("VmRSS"), kb("VmHWM")
loaded = load_model(prepared)
print(json.dumps({"growth": kb("VmHWM") - before, "reset_ok": reset - before < 8 << 20,
                  "weight_bytes": loaded.weight_bytes}))
"""


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~400 MB of float32 GPT-2 weights (width 1024, 6 layers)."""
    dest = tmp_path_factory.mktemp("big") / "gpt2"
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=tiny_models.VOCAB, n_positions=256, n_embd=1024, n_layer=6, n_head=16
    )
    transformers.GPT2LMHeadModel(cfg).save_pretrained(dest)
    tiny_models.copy_tokenizer(dest)
    return dest


def _peak(path: Path, stream: bool) -> dict[str, Any]:
    env = os.environ | {
        "MODELCACHE_STREAMING_LOAD": "1" if stream else "0",
        "MODELCACHE_LOAD_BUFFERS": "2",
        "MODELCACHE_LOAD_BUFFER_MIB": "32",
    }
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["reset_ok"], "VmHWM could not be reset: the measurement would be meaningless"
    return out


def test_streaming_host_memory_is_model_plus_ring(big_checkpoint: Path) -> None:
    """float32 checkpoint (~400 MB) into bfloat16 (~200 MB): the whole-shard path holds
    shard + casts (~600 MB); streaming holds the model, two 32 MiB buffers and slack."""
    size = sum(f.stat().st_size for f in big_checkpoint.glob("*.safetensors"))
    assert size > 380e6
    streamed = _peak(big_checkpoint, stream=True)
    bound = streamed["weight_bytes"] + 2 * 32 * MIB + 48 * MIB
    print(f"checkpoint {size / MIB:.0f} MiB, model {streamed['weight_bytes'] / MIB:.0f} MiB")
    print(f"streamed peak growth {streamed['growth'] / MIB:.0f} MiB (bound {bound / MIB:.0f})")
    assert streamed["growth"] <= bound
    whole = _peak(big_checkpoint, stream=False)
    print(f"whole-shard peak growth {whole['growth'] / MIB:.0f} MiB")
    assert whole["growth"] > size  # the measurement sees a checkpoint-sized peak


def _fail(path: Path, task: str, monkeypatch: pytest.MonkeyPatch, stream: bool) -> Any:
    monkeypatch.setenv("MODELCACHE_STREAMING_LOAD", "1" if stream else "0")
    built: list[int] = []

    def counting(real: Any) -> Any:
        def counted(*a: Any) -> Any:
            built.append(1)
            return real(*a)

        return counted

    for name in ("construct", "construct_on"):
        monkeypatch.setattr(loader, name, counting(getattr(loader, name)))
    entry = load_one(path, task)
    assert entry.state is ModelState.FAILED
    assert entry.error_class == "out_of_memory", entry.error
    assert not built, "the check must come before any allocation"
    return entry


def test_free_device_memory_is_checked_before_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_models.llama(tmp_path / "llama")
    monkeypatch.setenv("MODELCACHE_LOAD_BUFFERS", "2")
    monkeypatch.setattr(hostmem, "device_free_bytes", lambda device: 4096)
    entry = _fail(path, "causal-lm", monkeypatch, stream=True)
    shard = read_header(path / "model.safetensors")
    params = streaming.model_bytes([shard], torch.float32)
    assert f"needs {params + 2 * shard.size} bytes" in str(entry.error)
    assert "only 4096 bytes" in str(entry.error)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streaming"])
def test_too_little_mem_available_is_out_of_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    path = tiny_models.gpt2(tmp_path / "gpt2")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  8000000 kB\nMemFree:  1000 kB\nMemAvailable:  1024 kB\n")
    monkeypatch.setattr(hostmem, "MEMINFO", meminfo)
    entry = _fail(path, "causal-lm", monkeypatch, stream=stream)
    assert "only 1048576 bytes" in str(entry.error) and "host memory" in str(entry.error)


def test_a_cgroup_limit_counts_and_page_cache_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "proc_cgroup").write_text("4:memory:/pod/c\n3:cpu:/pod/c\n")
    leaf, parent = tmp_path / "cg/memory/pod/c", tmp_path / "cg/memory/pod"
    leaf.mkdir(parents=True)
    (leaf / "memory.limit_in_bytes").write_text(str(1 << 62))  # no limit at the leaf
    (leaf / "memory.usage_in_bytes").write_text("1000")
    (parent / "memory.limit_in_bytes").write_text(str(10 * MIB))
    (parent / "memory.usage_in_bytes").write_text(str(9 * MIB))
    # v1: the subtree's (total_) file cache, inactive and active, is reclaimable.
    (parent / "memory.stat").write_text(
        f"cache 5\ninactive_file 7\nactive_file 7\n"
        f"total_inactive_file {3 * MIB}\ntotal_active_file {MIB}\n"
    )
    monkeypatch.setattr(hostmem, "PROC_CGROUP", tmp_path / "proc_cgroup")
    monkeypatch.setattr(hostmem, "CGROUP_ROOT", tmp_path / "cg")
    assert hostmem.available_bytes() == 5 * MIB
    v2 = tmp_path / "v2"
    (v2 / "kubepods/pod1").mkdir(parents=True)
    (v2 / "kubepods/pod1/memory.max").write_text(f"{8 * MIB}\n")
    (v2 / "kubepods/pod1/memory.current").write_text(f"{7 * MIB}\n")
    (v2 / "kubepods/memory.max").write_text("max\n")
    (v2 / "kubepods/memory.current").write_text("1\n")
    (tmp_path / "proc_cgroup").write_text("0::/kubepods/pod1\n")
    monkeypatch.setattr(hostmem, "CGROUP_ROOT", v2)
    assert hostmem.available_bytes() == 1 * MIB
    path = tiny_models.bert(tmp_path / "bert")
    entry = _fail(path, "embedding", monkeypatch, stream=False)
    assert f"only {MIB} bytes" in str(entry.error)


def test_cuda_free_memory_comes_from_the_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA branch, without a GPU: the probe is mem_get_info, the need counts the
    parameters in the target dtype plus one staging buffer, the ring is pinned host memory."""
    asked: list[torch.device] = []

    def mem_get_info(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return 123, 1 << 40

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    cuda = torch.device("cuda", 1)
    assert hostmem.device_free_bytes(cuda) == 123 and asked == [cuda]
    # Blocks the caching allocator reserved but no tensor uses are free for a load too.
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 500)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100)
    assert hostmem.device_free_bytes(cuda) == 123 + 400
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    shard = read_header(tiny_models.llama(tmp_path / "llama") / "model.safetensors")
    bf16 = streaming.model_bytes([shard], torch.bfloat16)
    assert bf16 * 2 == streaming.model_bytes([shard], torch.float32)
    with pytest.raises(Exception) as info:
        streaming.check_memory([shard], cuda, torch.bfloat16)
    assert getattr(info.value, "error_class", None) == "out_of_memory"
    assert f"needs {bf16 + shard.size} bytes" in str(info.value) and "cuda:1" in str(info.value)
