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

Failure handling (devicefaults.py names the kinds): an out-of-memory batch is split in
two and each half computed again, down to single sequences; one that does not fit alone
fails its request with ``TooLarge`` (RESOURCE_EXHAUSTED, naming its token count). Any other
``Exception`` fails the request it was computing (``ComputeFailed``) and the worker goes
on; when the batch held several requests, each is computed again alone first, so one
request the model cannot take does not fail the others batched with it. Retries run after
the ``except`` block has ended: inside it, the traceback would keep the failed pass's
frames, and with them its activations, alive while the retry allocates its own. A device
error that poisons the CUDA context fails everything with ``DeviceLost`` (UNAVAILABLE) and
ends the worker for good: the watchdog reports NOT_SERVING and stops the process.
Anything that ends the thread otherwise fails the batch it was running (``WorkerDied``) at
once and wakes the watchdog (health.py), which restarts the worker or fails the batcher, so
requests are refused instead of hanging. Cancelled requests and requests past their
deadline are dropped before they are computed.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from modelcache.config import BatchingConfig
from modelcache.daemon import devicefaults
from modelcache.daemon.batchfailures import FailureRecovery
from modelcache.daemon.batchjobs import (
    BatcherFailed,
    BatchError,
    BatcherStopped,
    ComputeFailed,
    DeadlineExpired,
    DeviceLost,
    Job,
    QueueFull,
    TooLarge,
    WorkerDied,
    _Seq,
    select_batch,
)
from modelcache.metrics import (
    BATCH_SIZE,
    BATCH_TOKENS,
    QUEUE_DEPTH,
    REQUEST_DURATION,
    TOKENS,
)

__all__ = [
    "BatchError",
    "Batcher",
    "BatcherFailed",
    "BatcherStopped",
    "ComputeFailed",
    "DeadlineExpired",
    "DeviceLost",
    "Job",
    "QueueFull",
    "TooLarge",
    "WorkerDied",
    "select_batch",
]

log = logging.getLogger(__name__)

Compute = Callable[[Sequence[Any]], Sequence[Any]]
#: A batch running longer than this marks its model NOT_SERVING (a hung device, not a
#: slow batch: a full batch of a large model on a CPU takes seconds, not minutes).
STALL_AFTER_S = 300.0


class Batcher(FailureRecovery):
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
        self.device_lost = ""  # set when the device failed for good (devicefaults.py)
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
            and not self.device_lost
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
        if self.device_lost:  # a restart would compute on a poisoned context
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
            if self.device_lost:
                raise DeviceLost(self.device_lost)
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
                if self.device_lost:
                    return
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
        failure: tuple[devicefaults.Kind, str, str] | None = None
        try:
            outputs = self._compute_all(batch)
        except Exception as exc:
            # Only strings leave this block: the exception's traceback holds the failed
            # pass's frames (and its activations) until the block ends.
            kind = devicefaults.classify(exc)
            if kind == "oom":  # expected under load: no traceback in the log
                failure = (kind, devicefaults.first_line(exc), "")
            else:
                failure = (kind, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        if failure is not None:
            self._recover(batch, *failure)
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
