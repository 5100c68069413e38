"""One load per model whatever the callers; loads isolated from transformers' global races."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import tiny_models
import torch
from loader_helpers import load_one, metric, outputs, spec
from transformers import initialization as hf_init

from modelcache.config import parse_config
from modelcache.daemon import globalstate
from modelcache.daemon import registry as reg
from modelcache.daemon.errors import ModelLoadError
from modelcache.daemon.registry import ModelRegistry, ModelState


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_64_threads_cause_exactly_one_load(tmp_path: Path) -> None:
    path = tiny_models.gpt2(tmp_path / "gpt2", layers=4, width=256)
    registry = ModelRegistry(parse_config({"models": [spec("m", path, "causal-lm")]}))
    registry.prepare()
    barrier = threading.Barrier(64)
    results: list[object] = [None] * 64

    def call(i: int) -> None:
        barrier.wait()
        results[i] = registry.get("m")

    rss0 = _rss_bytes()
    threads = [threading.Thread(target=call, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert registry.load_count["m"] == 1
    assert all(r is results[0] for r in results)
    weight_bytes = results[0].weight_bytes  # type: ignore[attr-defined]
    # One copy of the weights (plus allocator slack), not 64.
    assert _rss_bytes() - rss0 < 4 * weight_bytes + 64 * 2**20
    registry.close()


def test_64_coroutines_cause_exactly_one_load(tmp_path: Path) -> None:
    path = tiny_models.bert(tmp_path / "bert")
    registry = ModelRegistry(parse_config({"models": [spec("m", path, "embedding")]}))
    registry.prepare()

    async def main() -> list[object]:
        return await asyncio.gather(*(registry.aget("m") for _ in range(64)))

    got = asyncio.run(main())
    assert registry.load_count["m"] == 1 and all(g is got[0] for g in got)
    registry.close()


def test_failed_load_is_shared_then_retryable(tmp_path: Path) -> None:
    path = tmp_path / "later"
    registry = ModelRegistry(parse_config({"models": [spec("m", path, "embedding")]}))
    registry.prepare()
    assert registry.entry("m").state is ModelState.FAILED
    with globalstate.LOAD_LOCK:  # keep the retry in flight while 16 callers arrive
        futures = [registry.load_async("m") for _ in range(16)]
    errors = {id(f.exception()) for f in futures}
    assert len(errors) == 1  # everyone waiting got the same error object
    assert isinstance(futures[0].exception(), ModelLoadError)
    assert "does not exist" in str(futures[0].exception())
    tiny_models.bert(path)  # the files arrive; the name is not poisoned
    assert registry.get("m").spec.name == "m"
    assert registry.entry("m").state is ModelState.READY
    registry.close()


def test_concurrent_mixed_dtype_models_get_their_own_dtype(tmp_path: Path) -> None:
    models = []
    for dtype in ("float32", "bfloat16", "float16"):
        models.append(spec(dtype, tiny_models.llama(tmp_path / dtype), "causal-lm", dtype=dtype))
    registry = ModelRegistry(parse_config({"models": models}))
    registry.prepare()
    out: dict[str, torch.dtype] = {}

    def call(name: str) -> None:
        lm = registry.get(name)
        out[name] = next(iter({p.dtype for p in lm.model.parameters()}))

    threads = [threading.Thread(target=call, args=(m["name"],)) for m in models for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    assert torch.get_default_dtype() == torch.float32
    registry.close()


def test_global_state_leaked_by_a_third_party_thread_is_restored_and_counted(
    tmp_path: Path,
) -> None:
    """What the racing from_pretrained calls leave behind (measured, issue #2): transformers'
    own context managers entered and never exited, and the default dtype switched."""
    path = tiny_models.gpt2(tmp_path / "gpt2")
    reference = tiny_models.reference(path, "causal-lm")
    inputs = tiny_models.encode(path)

    leaked = []

    def third_party() -> None:
        for cm in (
            hf_init.no_init_weights(),
            hf_init.no_tie_weights(),
            hf_init.meta_device_safe_creation_ops(),
        ):
            cm.__enter__()
            leaked.append(cm)
        torch.set_default_dtype(torch.bfloat16)

    t = threading.Thread(target=third_party)
    t.start()
    t.join()
    try:
        before = metric("modelcache_meta_tensor_errors_total", model="m", kind="global_state")
        entry = load_one(path, "causal-lm")
        assert entry.state is ModelState.READY, entry.error
        lm = entry.loaded
        assert lm is not None
        assert (
            metric("modelcache_meta_tensor_errors_total", model="m", kind="global_state")
            == before + 1
        )
        # Restored: tying works, init functions are real, default dtype is back.
        assert torch.get_default_dtype() == torch.float32
        assert globalstate.check_and_restore() == []
        assert (
            lm.model.get_output_embeddings().weight.data_ptr()
            == lm.model.get_input_embeddings().weight.data_ptr()
        )
        assert torch.equal(
            outputs(lm.model, inputs, "causal-lm"), outputs(reference, inputs, "causal-lm")
        )
    finally:
        globalstate.check_and_restore()


@pytest.mark.parametrize("n", [16])
def test_racing_from_pretrained_threads_cannot_hurt_a_later_load(tmp_path: Path, n: int) -> None:
    """Reproduce the race itself with transformers' from_pretrained in n threads, then load
    through modelcache: whatever the race left, the load is correct."""
    import transformers

    path = tiny_models.gpt2(tmp_path / "gpt2")
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    barrier = threading.Barrier(n)

    def race(i: int) -> None:
        barrier.wait()
        with contextlib.suppress(Exception):
            transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtypes[i % 3])

    threads = [threading.Thread(target=race, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        entry = load_one(path, "causal-lm")
        assert entry.state is ModelState.READY, entry.error
        ref_state = tiny_models.reference(path, "causal-lm").state_dict()
        assert entry.loaded is not None
        for k, v in entry.loaded.model.state_dict().items():
            assert torch.equal(v, ref_state[k]), k
    finally:
        globalstate.check_and_restore()


def test_a_streamed_read_leaves_the_load_lock_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reads and copies of a streamed load run without LOAD_LOCK (a load onto another
    device may build meanwhile), and the load is still bit-exact and fully verified."""
    from modelcache.daemon import streaming

    monkeypatch.setenv("MODELCACHE_STREAMING_LOAD", "1")
    path = tiny_models.llama(tmp_path / "llama")
    free_during_run: list[bool] = []
    real = streaming.Stream.run

    def probed(self: streaming.Stream) -> None:
        got: list[bool] = []

        def probe() -> None:  # another thread, as another device's loader would be
            ok = globalstate.LOAD_LOCK.acquire(timeout=2)
            got.append(ok)
            if ok:
                globalstate.LOAD_LOCK.release()

        t = threading.Thread(target=probe)
        t.start()
        t.join()
        free_during_run.extend(got)
        real(self)

    monkeypatch.setattr(streaming.Stream, "run", probed)
    entry = load_one(path, "causal-lm")
    assert entry.state is ModelState.READY, entry.error
    assert free_during_run == [True]
    monkeypatch.setenv("MODELCACHE_STREAMING_LOAD", "0")
    whole = load_one(path, "causal-lm")
    assert whole.loaded is not None and entry.loaded is not None
    assert whole.loaded.fingerprint == entry.loaded.fingerprint


def _stand_in_loads(monkeypatch: pytest.MonkeyPatch, load: Callable[[Any], Any]) -> None:
    """The registry with ``load`` in place of loader.load_model and nothing to resolve: its
    queues, Futures and loader threads run as they are, around a load the test controls."""
    monkeypatch.setattr(reg, "load_model", load)
    monkeypatch.setattr(reg, "_prepare", lambda spec, config: SimpleNamespace(spec=spec))


class _Lanes:
    """A stand-in for loader.load_model that records which loads ran at the same time."""

    def __init__(self, hold: float) -> None:
        self.hold, self.lock = hold, threading.Lock()
        self.running: set[str] = set()
        self.together: list[set[str]] = []

    def __call__(self, prepared: object) -> object:
        name = prepared.spec.name  # type: ignore[attr-defined]
        with self.lock:
            self.running.add(name)
            if len(self.running) > 1:
                self.together.append(set(self.running))
        threading.Event().wait(self.hold)
        with self.lock:
            self.running.discard(name)
        raise ModelLoadError("internal", f"{name}: the stand-in loads nothing")


def test_loads_onto_different_devices_overlap_and_one_device_loads_one_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lanes = _Lanes(hold=1.0)
    _stand_in_loads(monkeypatch, lanes)
    devices = {"a": "cuda", "b": "cuda:0", "c": "cuda:1", "d": "cpu"}
    models = [
        {"name": n, "source": f"/nowhere/{n}", "task": "embedding", "device": d}
        for n, d in devices.items()
    ]
    registry = ModelRegistry(parse_config({"models": models}))
    idle_calls: list[tuple[bool, set[str]]] = []
    registry.add_idle_listener(lambda: idle_calls.append((registry.idle(), set(lanes.running))))
    entries = registry.load_all()
    assert {e.state for e in entries} == {ModelState.FAILED}
    assert all(registry.load_count[n] == 1 for n in devices)
    # a and b are one GPU (cuda is cuda:0): never together; c and d overlap with them.
    assert lanes.together, "no two loads ever ran at the same time"
    assert not any({"a", "b"} <= group for group in lanes.together)
    assert any("c" in group for group in lanes.together)
    assert any("d" in group for group in lanes.together)
    assert registry.idle()
    # The idle listener (the serve process freezes its heap there) runs once no loader of
    # any device has work: never while another device's load is half done.
    deadline = time.monotonic() + 10
    while not idle_calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert idle_calls and all(idle and not running for idle, running in idle_calls)
    registry.close()


def test_a_superseded_load_meeting_a_closed_registry_fails_its_waiters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The spec changes while its load runs (the load is superseded and must be redone),
    and the daemon closes meanwhile: the waiters get an error, they do not wait for ever."""
    started, release = threading.Event(), threading.Event()

    def blocking_load(prepared: object) -> object:
        started.set()
        release.wait(10)
        raise ModelLoadError("internal", "the stand-in loads nothing")

    _stand_in_loads(monkeypatch, blocking_load)
    model = {"name": "m", "source": "/nowhere/m", "task": "embedding"}
    registry = ModelRegistry(parse_config({"models": [model]}))
    fut = registry.load_async("m")
    assert started.wait(10)
    registry.apply(parse_config({"models": [{**model, "max_length": 64}]}))
    registry.close()
    release.set()
    with pytest.raises(ModelLoadError, match="shutting down"):
        fut.result(timeout=10)


def test_a_load_moved_to_another_device_while_queued_runs_on_that_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """x waits on cuda:0 behind y; its spec moves to cuda:1 meanwhile: x's load runs on
    cuda:1's loader (so it never overlaps another cuda:1 load), once."""
    release = threading.Event()
    threads: dict[str, str] = {}

    def load(prepared: object) -> object:
        spec = prepared.spec  # type: ignore[attr-defined]
        threads[spec.name] = f"{threading.current_thread().name} for {spec.device}"
        if spec.name == "y":
            release.wait(10)
        raise ModelLoadError("internal", "the stand-in loads nothing")

    _stand_in_loads(monkeypatch, load)
    y = {"name": "y", "source": "/nowhere/y", "task": "embedding", "device": "cuda:0"}
    x = {**y, "name": "x", "source": "/nowhere/x"}
    registry = ModelRegistry(parse_config({"models": [y, x]}))
    futures = registry.start_all()
    deadline = time.monotonic() + 10
    while "y" not in threads and time.monotonic() < deadline:
        time.sleep(0.01)
    registry.apply(parse_config({"models": [y, {**x, "device": "cuda:1"}]}))
    release.set()
    for fut in futures:
        with contextlib.suppress(ModelLoadError):
            fut.result(10)
    assert threads["x"] == "modelcache-loader-cuda:1 for cuda:1"
    assert registry.load_count["x"] == 1
    registry.close()


def test_a_loader_thread_that_cannot_start_fails_its_load_and_the_next_one_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pids limit refuses a thread: the waiters get that reason at once (not a Future
    pending for ever), and the device's loader is not left marked busy."""

    def load(prepared: object) -> object:
        raise ModelLoadError("internal", "the stand-in loads nothing")

    _stand_in_loads(monkeypatch, load)
    real_start = threading.Thread.start
    refused: list[str] = []

    def start(self: threading.Thread) -> None:
        if self.name.startswith("modelcache-loader") and not refused:
            refused.append(self.name)
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    model = {"name": "m", "source": "/nowhere/m", "task": "embedding"}
    registry = ModelRegistry(parse_config({"models": [model]}))
    with pytest.raises(ModelLoadError, match="cannot start a loader thread"):
        registry.load_async("m").result(timeout=5)
    assert refused and registry.idle()
    with pytest.raises(ModelLoadError, match="stand-in"):
        registry.load_async("m").result(timeout=10)
    registry.close()
