"""Tokenization from many threads with different truncate flags: each call gets its own
setting (the fast tokenizer keeps truncation as shared state; found by the wire fuzz)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import tiny_models
from loader_helpers import load_one

from modelcache.daemon.inference import InputError, ModelCompute


def test_concurrent_truncate_flags_do_not_leak_between_calls(tmp_path: Path) -> None:
    lm = load_one(tiny_models.gpt2(tmp_path / "g"), "causal-lm", max_length=24).loaded
    assert lm is not None
    compute = ModelCompute(lm)
    long_text = " ".join(["modelcache"] * 40)  # well over 24 tokens
    short_text = "a short one"
    errors: list[str] = []
    barrier = threading.Barrier(4)

    def truncating() -> None:
        barrier.wait()
        for _ in range(300):
            (seq,) = compute.tokenize([long_text], truncate=True)
            if len(seq) != 24:
                errors.append(f"truncate=True gave {len(seq)} tokens")

    def strict() -> None:
        barrier.wait()
        for _ in range(300):
            try:
                compute.tokenize([long_text], truncate=False)
                errors.append("truncate=False accepted an over-long input")
            except InputError:
                pass
            compute.tokenize([short_text], truncate=False)

    threads = [threading.Thread(target=f) for f in (truncating, truncating, strict, strict)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]


def test_niced_admission_threads_tokenize_below_the_forward_pass_priority() -> None:
    """On a CPU device a tokenizer taking a core from torch's intra-op threads stalls them
    all; with MODELCACHE_ADMIT_NICE the admission pool's threads run niced (opt-in)."""
    from concurrent.futures import ThreadPoolExecutor

    from modelcache.daemon.server import lower_thread_priority

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = niceness()
    with ThreadPoolExecutor(2, initializer=lower_thread_priority, initargs=(19,)) as pool:
        assert set(pool.map(lambda _: niceness(), range(8))) == {19}
    with ThreadPoolExecutor(1, initializer=lower_thread_priority, initargs=(0,)) as pool:
        assert pool.submit(niceness).result() == before  # never raised, never lowered by 0
    assert niceness() == before  # only the pool's own threads change
