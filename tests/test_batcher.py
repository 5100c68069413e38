"""The batch queue on its own, with plain-Python compute functions: merging, budgets,
length bucketing, admission bounds, cancellation, deadlines, failures, worker death."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import wait
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelcache.config import BatchingConfig
from modelcache.daemon.batcher import (
    Batcher,
    BatcherFailed,
    BatcherStopped,
    ComputeFailed,
    DeadlineExpired,
    DeviceLost,
    QueueFull,
    TooLarge,
    WorkerDied,
    select_batch,
)


class Death(BaseException):
    """Something that ends a thread (not an Exception, so the per-batch handler cannot
    catch it)."""


class Doubler:
    """Computes 2*x per item; records each batch; can hold a batch until released, and
    raise for chosen items."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.fail_on: dict[int, BaseException] = {}

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        assert self.release.wait(30)
        for item in items:
            if item in self.fail_on:
                raise self.fail_on[item]
        return [2 * i for i in items]

    def hold(self) -> None:
        self.entered.clear()
        self.release.clear()


def lengths_of(items: Sequence[int]) -> list[int]:
    return [i % 100 + 1 for i in items]  # the item encodes its own "token count"


@pytest.fixture
def compute() -> Doubler:
    return Doubler()


@pytest.fixture
def make(compute: Doubler) -> Iterator[Any]:
    made: list[Batcher] = []

    def _make(**cfg: Any) -> Batcher:
        b = Batcher(
            f"t{len(made)}-{time.monotonic_ns()}",
            "Embed",
            compute,
            BatchingConfig(**{"max_wait_ms": 0, **cfg}),
        )
        b.start()
        made.append(b)
        return b

    yield _make
    compute.release.set()
    for b in made:
        b.stop(timeout=10)


def submit(b: Batcher, items: list[int], deadline: float | None = None) -> Any:
    return b.submit(items, lengths_of(items), deadline)


def test_requests_are_merged_and_each_gets_its_own_results(make: Any, compute: Doubler) -> None:
    b = make(max_batch_size=64)
    compute.hold()
    first = submit(b, [1])
    assert compute.entered.wait(10)  # the worker is busy with `first`
    jobs = [submit(b, [10 * k + 1, 10 * k + 2]) for k in range(1, 9)]
    compute.release.set()
    assert first.future.result(10) == [2]
    for k, job in enumerate(jobs, start=1):
        assert job.future.result(10) == [20 * k + 2, 20 * k + 4]
    assert len(compute.batches) == 2 and len(compute.batches[1]) == 16


def test_padded_budget_and_row_limit(make: Any, compute: Doubler) -> None:
    b = make(max_batch_tokens=100, max_batch_size=4)
    compute.hold()
    submit(b, [0])
    assert compute.entered.wait(10)
    jobs = [submit(b, [n]) for n in (9, 19, 29, 39, 49, 9, 9, 9, 9, 9, 99)]
    compute.release.set()
    wait([j.future for j in jobs], timeout=10)
    for batch in compute.batches[1:]:
        widest = max(lengths_of(batch))
        assert len(batch) <= 4
        assert len(batch) == 1 or len(batch) * widest <= 100, batch
    assert [99] in compute.batches  # longer than the budget: runs alone


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 64), min_size=1, max_size=40), st.integers(1, 512), st.integers(1, 16)
)
def test_selection_invariants(lengths: list[int], max_tokens: int, max_rows: int) -> None:
    picked = select_batch(lengths, max_tokens, max_rows)
    assert 0 in picked  # the oldest sequence is never passed over
    assert len(picked) == len(set(picked)) <= max_rows
    widths = [lengths[i] for i in picked]
    assert widths == sorted(widths)
    assert len(picked) == 1 or len(picked) * max(widths) <= max_tokens
    ranked = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    start = ranked.index(picked[0])
    assert ranked[start : start + len(picked)] == picked  # a contiguous run in length order


def test_selection_groups_similar_lengths() -> None:
    lengths = [30, 5, 31, 6, 29, 7, 32, 4]
    assert sorted(lengths[i] for i in select_batch(lengths, 10_000, 4)) == [29, 30, 31, 32]


def test_queue_full_is_immediate_and_a_big_request_fits_an_empty_queue(
    make: Any, compute: Doubler
) -> None:
    b = make(max_queue=4)
    compute.hold()
    running = submit(b, [1])
    assert compute.entered.wait(10)
    queued = submit(b, [1, 2, 3])
    started = time.perf_counter()
    with pytest.raises(QueueFull, match="queue full"):
        submit(b, [4, 5])
    assert time.perf_counter() - started < 0.5
    assert b.has_room(1) and not b.has_room(2)
    compute.release.set()
    assert queued.future.result(10) == [2, 4, 6] and running.future.result(10) == [2]
    big = submit(b, list(range(10)))  # more than max_queue, but the queue is empty
    assert big.future.result(10) == [2 * i for i in range(10)]


def test_cancelled_and_expired_requests_are_not_computed(make: Any, compute: Doubler) -> None:
    b = make()
    compute.hold()
    submit(b, [1])
    assert compute.entered.wait(10)
    cancelled = submit(b, [77])
    expired = submit(b, [78], deadline=time.monotonic() - 1)
    kept = submit(b, [79])
    assert b._depth._value.get() == 3
    b.cancel(cancelled)
    assert b._depth._value.get() == 2
    compute.release.set()
    assert kept.future.result(10) == [158]
    with pytest.raises(DeadlineExpired):
        expired.future.result(10)
    assert cancelled.future.cancelled()
    assert not any(77 in batch or 78 in batch for batch in compute.batches)


def test_an_exception_fails_its_batch_and_the_worker_goes_on(make: Any, compute: Doubler) -> None:
    b = make()
    compute.fail_on[13] = ValueError("bad row")
    with pytest.raises(ComputeFailed, match="ValueError: bad row"):
        submit(b, [13]).future.result(10)
    assert submit(b, [4]).future.result(10) == [8]
    assert b.healthy()


def test_a_dead_worker_fails_its_batch_at_once_and_can_be_restarted(
    make: Any, compute: Doubler
) -> None:
    died = threading.Event()
    b = make()
    b._on_death = died.set
    compute.fail_on[66] = Death("gone")
    with pytest.raises(WorkerDied, match=r"died while computing this request \(Death: gone\)"):
        submit(b, [66]).future.result(10)
    assert died.wait(10) and b.dead() and not b.healthy()
    waiting = submit(b, [5])  # queued while no worker runs: served after the restart
    b.start()
    assert waiting.future.result(10) == [10] and b.healthy() and not b.dead()


def test_a_failed_batcher_refuses_everything(make: Any, compute: Doubler) -> None:
    b = make()
    compute.hold()
    running = submit(b, [1])
    assert compute.entered.wait(10)
    queued = submit(b, [2])
    b.fail_permanently("its worker died 6 times")
    with pytest.raises(BatcherFailed, match="died 6 times"):
        queued.future.result(10)
    with pytest.raises(BatcherFailed):
        submit(b, [3])
    compute.release.set()
    assert running.future.result(10) == [2]
    assert not b.healthy() and not b.dead()


def test_stop_fails_the_queue_and_finishes_the_running_batch(make: Any, compute: Doubler) -> None:
    b = make()
    compute.hold()
    running = submit(b, [3])
    assert compute.entered.wait(10)
    queued = submit(b, [4])
    stopper = threading.Thread(target=b.stop)
    stopper.start()
    with pytest.raises(BatcherStopped):
        queued.future.result(10)
    compute.release.set()
    stopper.join(10)
    assert running.future.result(10) == [6]
    with pytest.raises(BatcherStopped):
        submit(b, [1])


def test_a_batch_waits_only_for_requests_on_their_way(make: Any, compute: Doubler) -> None:
    b = make(max_wait_ms=10_000)
    started = time.perf_counter()
    assert submit(b, [1]).future.result(10) == [2]  # nothing announced: no waiting
    assert time.perf_counter() - started < 5
    b.expect(+1)  # a request is being tokenized...
    first = submit(b, [2])
    second = b.submit([3], [4], announced=True)  # ...and has arrived: the batch goes
    assert first.future.result(10) == [4] and second.future.result(10) == [6]
    assert compute.batches[-1] == [2, 3]
    b.expect(+1)
    third = submit(b, [4])
    b.expect(-1)  # the announced request was refused: no reason to wait any longer
    assert third.future.result(10) == [8]


def test_a_batch_that_runs_too_long_marks_the_batcher_unhealthy(
    make: Any, compute: Doubler
) -> None:
    b = make()
    b.stall_after = 0.05
    compute.hold()
    job = submit(b, [1])
    assert compute.entered.wait(10)
    deadline = time.monotonic() + 10
    while not b.stalled():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not b.healthy() and not b.dead()
    compute.release.set()
    assert job.future.result(10) == [2]
    assert not b.stalled() and b.healthy()


class SmallDevice(Doubler):
    """A device that holds at most ``capacity`` padded tokens per batch: above that the
    compute allocates its "activations" and raises like torch's CUDA allocator. Records
    whether the activations of the previous failed batch were still alive when the next
    batch started (they are, if the retry runs inside the ``except`` block)."""

    def __init__(self, capacity: int, error: type[Exception] = torch.OutOfMemoryError) -> None:
        super().__init__()
        self.capacity, self.error = capacity, error
        self.failed: list[weakref.ref[torch.Tensor]] = []
        self.alive_at_retry: list[bool] = []

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.alive_at_retry += [ref() is not None for ref in self.failed]
        padded = len(items) * max(lengths_of(items))
        if padded > self.capacity:
            self.batches.append(list(items))
            activations = torch.empty(padded, 1024)
            self.failed.append(weakref.ref(activations))
            raise self.error(f"CUDA out of memory. Tried to allocate {padded} tokens")
        return super().__call__(items)


def test_an_oom_batch_is_split_until_it_fits(make: Any) -> None:
    device = SmallDevice(capacity=40)
    b = make(max_batch_size=64)
    b._compute = device
    device.hold()
    first = submit(b, [1])
    assert device.entered.wait(10)
    jobs = [submit(b, [8 + k, 8 + k]) for k in range(4)]  # 8 rows of ~10 tokens: 80 > 40
    device.release.set()
    assert first.future.result(10) == [2]
    for k, job in enumerate(jobs):
        assert job.future.result(10) == [2 * (8 + k)] * 2
    assert len(device.failed) >= 1 and sum(map(len, device.batches)) > 8
    # Every retry ran after the failed batch's activations had been freed.
    assert device.alive_at_retry and not any(device.alive_at_retry)
    assert b.healthy()


def test_a_sequence_that_does_not_fit_alone_is_too_large(make: Any) -> None:
    device = SmallDevice(capacity=40)
    b = make(max_batch_size=64)
    b._compute = device
    device.hold()
    first = submit(b, [1])
    assert device.entered.wait(10)
    big = submit(b, [3, 49])  # sequence 1 has 50 tokens
    small = submit(b, [4, 5])
    device.release.set()
    first.future.result(10)
    with pytest.raises(TooLarge, match=r"sequence 1 of the request has 50 tokens.*alone"):
        big.future.result(10)
    assert small.future.result(10) == [8, 10]
    assert submit(b, [7]).future.result(10) == [14] and b.healthy()


@pytest.mark.parametrize("error", ["a RuntimeError", "torch's AcceleratorError"])
def test_a_device_failure_is_fatal_for_the_batcher(make: Any, error: str) -> None:
    """A poisoned CUDA context: the batch and the queue fail with DeviceLost, nothing is
    retried or restarted, and the batcher refuses new work."""
    exc: Exception = (
        RuntimeError("CUDA error: device-side assert triggered")
        if error == "a RuntimeError"
        else torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    )
    device = Doubler()
    died = threading.Event()
    b = make(max_batch_size=1)
    b._compute, b._on_death = device, died.set
    device.fail_on[13] = exc
    device.hold()
    failing = submit(b, [13])
    assert device.entered.wait(10)
    queued = submit(b, [4])
    device.release.set()
    for job in (failing, queued):
        with pytest.raises(DeviceLost, match="CUDA error"):
            job.future.result(10)
    assert died.wait(10) and b.device_lost and not b.healthy() and not b.dead()
    with pytest.raises(DeviceLost):
        submit(b, [5])
    assert device.batches == [[13]]  # neither retried nor anything computed after it


def test_nothing_runs_after_a_retry_lost_the_device(make: Any) -> None:
    """An OOM batch split in halves whose first half hits a poisoned context: the second
    half is not computed on it (nor counted twice); its requests fail DeviceLost too."""
    device = SmallDevice(capacity=40)
    b = make(max_batch_size=64)
    b._compute, b._on_death = device, lambda: None
    device.hold()
    first = submit(b, [1])
    assert device.entered.wait(10)
    jobs = [submit(b, [8 + k, 8 + k]) for k in range(4)]  # 80 padded tokens: split
    device.fail_on = {
        8 + k: RuntimeError("CUDA error: device-side assert triggered") for k in range(4)
    }
    device.release.set()
    assert first.future.result(10) == [2]
    for job in jobs:
        with pytest.raises(DeviceLost):
            job.future.result(10)
    # [1], the whole batch (OOM), its first half (device lost): nothing ran after that.
    assert len(device.batches) == 3 and len(device.batches[2]) == 4, device.batches
