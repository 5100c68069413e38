"""Per-model dynamic batching (TEI-style): one bounded queue, one worker thread.

Requests from any number of clients are split into sequences on admission and merged into
batches under ``max_batch_tokens`` (padded: rows x longest row) and ``max_batch_size``.
A batch always contains the oldest waiting sequence (no starvation) and is grown around
it with the sequences closest in length, so padding stays small even when a request's
sequences have very different lengths.

The forward pass runs on this batcher's own thread, never on the event loop. While it
runs, the servicer tokenizes the next requests on its executor and admits them here, so
tokenization overlaps compute. The servicer announces requests it is tokenizing
(``expect``); a batch waits at most ``max_wait_ms`` for those, and never waits when no
request is on its way, so a lone request is not delayed. While the worker is busy,
requests queue up and the next batch is whatever is waiting.

Failure handling: an ``Exception`` from the compute function fails the request it was
computing (``ComputeFailed``) and the worker goes on; when the batch held several requests,
each is computed again alone first, so one request the model cannot take does not fail the
others batched with it. Anything that ends the thread fails the batch it was running
(``WorkerDied``) at once and wakes the watchdog (health.py), which restarts the worker or
fails the batcher, so requests are refused instead of hanging. Cancelled requests and
requests past their deadline are dropped before they are computed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from modelcache.config import BatchingConfig
from modelcache.metrics import (
    BATCH_SIZE,
    BATCH_TOKENS,
    QUEUE_DEPTH,
    REQUEST_DURATION,
    TOKENS,
)

log = logging.getLogger(__name__)

Compute = Callable[[Sequence[Any]], Sequence[Any]]
#: A batch running longer than this marks its model NOT_SERVING (a hung device, not a
#: slow batch: a full batch of a large model on a CPU takes seconds, not minutes).
STALL_AFTER_S = 300.0


class BatchError(Exception):
    """Why a request was not computed; the servicer maps each subclass to a status."""


class QueueFull(BatchError):
    pass


class ComputeFailed(BatchError):
    pass


class WorkerDied(BatchError):
    pass


class BatcherFailed(BatchError):
    pass


class BatcherStopped(BatchError):
    pass


class DeadlineExpired(BatchError):
    pass


@dataclass(eq=False)
class Job:
    """One request: its sequences' results fill ``results``; ``future`` gets the list."""

    items: Sequence[Any]
    deadline: float | None  # time.monotonic()
    future: Future[list[Any]] = field(default_factory=Future)
    admitted: float = field(default_factory=time.perf_counter)
    results: list[Any] = field(default_factory=list)
    remaining: int = 0
    started: bool = False
    cancelled: bool = False

    def cancel(self) -> None:
        """Mark abandoned: the worker skips whatever has not been computed yet."""
        self.cancelled = True
        self.future.cancel()

    def fail(self, exc: BaseException) -> None:
        # The client may cancel the future at any moment from another thread.
        with contextlib.suppress(InvalidStateError):
            self.future.set_exception(exc)

    def finish(self) -> None:
        with contextlib.suppress(InvalidStateError):
            self.future.set_result(self.results)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass(eq=False)
class _Seq:
    job: Job
    index: int
    length: int


def select_batch(lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[int]:
    """Indices (into ``lengths``, oldest first) of the next batch, shortest first.

    The oldest sequence (index 0) is always in it; neighbours in length order are added,
    whichever side adds less padding, while rows x longest <= ``max_tokens`` and rows <=
    ``max_rows``. A sequence longer than ``max_tokens`` runs alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    lo = hi = order.index(0)
    width = lengths[0]
    while hi - lo + 1 < max_rows:
        rows = hi - lo + 1
        cost_lo = cost_hi = None
        if lo > 0 and (rows + 1) * width <= max_tokens:
            cost_lo = width - lengths[order[lo - 1]]
        up = lengths[order[hi + 1]] if hi + 1 < len(order) else 0
        if hi + 1 < len(order) and (rows + 1) * up <= max_tokens:
            cost_hi = (up - width) * rows
        if cost_lo is None and cost_hi is None:
            break
        if cost_hi is None or (cost_lo is not None and cost_lo <= cost_hi):
            lo -= 1
        else:
            hi, width = hi + 1, up
    return order[lo : hi + 1]


class Batcher:
    def __init__(
        self,
        name: str,
        method: str,
        compute: Compute,
        cfg: BatchingConfig,
        on_death: Callable[[], None] | None = None,
        stall_after: float = STALL_AFTER_S,
    ) -> None:
        self.name, self.method, self.cfg = name, method, cfg
        self.stall_after = stall_after
        self._batch_started = 0.0  # time.monotonic() of the running batch, 0 when idle
        self._compute = compute
        self._on_death = on_death
        self._cond = threading.Condition()
        self._pending: list[_Seq] = []
        self._expected = 0  # requests being tokenized for this batcher
        self._running: list[_Seq] = []
        self._stopping = False
        self._draining = False
        self._thread: threading.Thread | None = None
        self._died = threading.Event()
        self.failure = ""  # set when the batcher gave up; requests are refused
        self.last_death = ""
        self._depth = QUEUE_DEPTH.labels(model=name)
        self._depth.set(0)

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker; after a death (watchdog only), start a fresh one."""
        if self._thread is not None:
            self._thread.join(5.0)  # it signalled its death from its last lines
        self._died.clear()
        self._thread = threading.Thread(target=self._run, name=f"batch-{self.name}", daemon=True)
        self._thread.start()

    def healthy(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        return (
            alive
            and not self._died.is_set()
            and not self.failure
            and not self._stopping
            and not self._draining
            and not self.stalled()
        )

    def stalled(self) -> bool:
        """One batch has been running for more than ``stall_after`` seconds: a thread
        cannot be killed, but the model is reported NOT_SERVING until it returns."""
        started = self._batch_started
        return bool(started) and time.monotonic() - started > self.stall_after

    def dead(self) -> bool:
        """The worker ended without being asked to: the watchdog should act."""
        if self._stopping or self._draining or self.failure or self._thread is None:
            return False
        return self._died.is_set() or not self._thread.is_alive()

    def fail_permanently(self, reason: str) -> None:
        """Give up: refuse new requests and fail the queued ones with ``reason``."""
        with self._cond:
            self.failure = reason
            pending, self._pending = self._pending, []
            self._depth.set(0)
        log.error("model %s: batcher failed: %s", self.name, reason)
        for s in pending:
            s.job.fail(BatcherFailed(reason))

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new work, fail what is queued, let the running batch finish."""
        with self._cond:
            self._stopping = True
            pending, self._pending = self._pending, []
            self._depth.set(0)
            self._cond.notify_all()
        for s in pending:
            s.job.fail(BatcherStopped(f"model {self.name} is shutting down"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def drain(self, timeout: float) -> bool:
        """Refuse new requests but compute every admitted one (and those being tokenized
        now, announced with ``expect``), then stop: how a removed or replaced model leaves.
        After ``timeout`` seconds what is left is failed as by ``stop``. True when drained."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        drained = thread is None or not thread.is_alive()
        self.stop(timeout=5.0)
        return drained

    def reconfigure(self, cfg: BatchingConfig) -> None:
        """New batching limits, from the next batch on (the daemon's config changed)."""
        with self._cond:
            self.cfg = cfg
            self._cond.notify_all()

    # -- admission (any thread) ------------------------------------------------------
    def has_room(self, n: int) -> bool:
        return not self._pending or len(self._pending) + n <= self.cfg.max_queue

    def expect(self, delta: int) -> None:
        """+1 when the servicer starts tokenizing a request for this batcher; -1 when it
        gives up on it (``submit(announced=True)`` counts the request as arrived)."""
        with self._cond:
            self._expected += delta
            if delta < 0:
                self._cond.notify()

    def submit(
        self,
        items: Sequence[Any],
        lengths: Sequence[int],
        deadline: float | None = None,
        announced: bool = False,
    ) -> Job:
        """Queue a request's sequences; raises at once when it cannot be accepted.

        The bound is ``max_queue`` sequences; a request that alone exceeds it is still
        admitted into an empty queue, so no valid request is unservable.
        """
        job = Job(items=items, deadline=deadline, remaining=len(items))
        job.results = [None] * len(items)
        with self._cond:
            if announced:
                self._expected -= 1
            if self.failure:
                raise BatcherFailed(self.failure)
            if self._stopping or (self._draining and not announced):
                raise BatcherStopped(f"model {self.name} is shutting down")
            if not self.has_room(len(items)):
                raise QueueFull(
                    f"model {self.name}: queue full ({len(self._pending)} "
                    f"sequences waiting, max_queue {self.cfg.max_queue})"
                )
            self._pending += [_Seq(job, i, n) for i, n in enumerate(lengths)]
            self._depth.set(len(self._pending))
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away (cancelled, or its deadline passed): drop its sequences
        from the queue now; any already in a running batch finish and are discarded."""
        job.cancel()
        with self._cond:
            self._pending = [s for s in self._pending if s.job is not job]
            self._depth.set(len(self._pending))

    # -- worker ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._running, self._batch_started = batch, time.monotonic()
                self._execute(batch)
                self._running, self._batch_started = [], 0.0
        except BaseException as exc:  # the thread ends here either way; say why, once
            self.last_death = f"{type(exc).__name__}: {exc}"
            log.critical("model %s: batch worker died", self.name, exc_info=True)
        finally:
            running, self._running, self._batch_started = self._running, [], 0.0
            if running:
                err = WorkerDied(
                    f"the batch worker of model {self.name} died while computing "
                    f"this request ({self.last_death}); it is being restarted"
                )
                for s in running:
                    s.job.fail(err)
            if not (self._stopping or self._draining):
                self._died.set()
                if self._on_death is not None:
                    self._on_death()

    def _next_batch(self) -> list[_Seq] | None:
        cfg = self.cfg
        with self._cond:
            while True:
                while not self._pending and not self._stopping:
                    if self._draining and self._expected <= 0:
                        return None  # drained: everything admitted was computed
                    self._cond.wait()
                if self._stopping:
                    return None
                # Wait (at most max_wait) for requests that are being tokenized right now,
                # unless the batch is already full.
                until = self._pending[0].job.admitted + cfg.max_wait_ms / 1000.0
                while (
                    self._pending
                    and not self._stopping
                    and self._expected > 0
                    and len(self._pending) < cfg.max_batch_size
                    and sum(s.length for s in self._pending) < cfg.max_batch_tokens
                    and (left := until - time.perf_counter()) > 0
                ):
                    self._cond.wait(left)
                self._drop_abandoned()
                if self._pending and not self._stopping:
                    picked = select_batch(
                        [s.length for s in self._pending], cfg.max_batch_tokens, cfg.max_batch_size
                    )
                    batch = [self._pending[i] for i in picked]
                    chosen = set(map(id, batch))
                    self._pending = [s for s in self._pending if id(s) not in chosen]
                    self._depth.set(len(self._pending))
                    return batch

    def _drop_abandoned(self) -> None:
        now = time.monotonic()
        keep: list[_Seq] = []
        for s in self._pending:
            if s.job.cancelled or s.job.future.done():
                continue
            if s.job.expired(now):
                s.job.fail(DeadlineExpired("deadline exceeded while queued"))
                continue
            keep.append(s)
        self._pending = keep
        self._depth.set(len(keep))

    def _compute_all(self, batch: list[_Seq]) -> Sequence[Any]:
        outputs = self._compute([s.job.items[s.index] for s in batch])
        if len(outputs) != len(batch):
            raise RuntimeError(
                f"compute returned {len(outputs)} results for {len(batch)} sequences"
            )
        return outputs

    def _execute(self, batch: list[_Seq]) -> None:
        start = time.perf_counter()
        for s in batch:
            if not s.job.started:
                s.job.started = True
                REQUEST_DURATION.labels(self.name, self.method, "queue").observe(
                    start - s.job.admitted
                )
        try:
            outputs = self._compute_all(batch)
        except Exception as exc:
            jobs = list(dict.fromkeys(s.job for s in batch))
            log.exception(
                "model %s: batch of %d sequences from %d requests failed",
                self.name,
                len(batch),
                len(jobs),
            )
            if len(jobs) == 1:
                jobs[0].fail(ComputeFailed(f"{type(exc).__name__}: {exc}"))
                return
            # One request may have caused it (an input the model cannot take): compute each
            # request alone, so that only the requests that fail on their own get the error.
            for job in jobs:
                if not job.cancelled and not job.future.done():
                    self._execute([s for s in batch if s.job is job])
            return
        elapsed = time.perf_counter() - start
        REQUEST_DURATION.labels(self.name, self.method, "compute").observe(elapsed)
        BATCH_SIZE.labels(self.name).observe(len(batch))
        BATCH_TOKENS.labels(self.name).observe(len(batch) * max(s.length for s in batch))
        TOKENS.labels(self.name, self.method).inc(sum(s.length for s in batch))
        for s, out in zip(batch, outputs, strict=True):
            job = s.job
            job.results[s.index] = out
            job.remaining -= 1
            if job.remaining == 0:
                job.finish()
