"""A thread that loads models (one per device): started when there is a load to run, gone
when there is none; and retries of failed loads on a capped exponential backoff.

Why a thread that exits: the thread that runs a model's warm-up forward owns an OpenMP pool,
and while it lives libgomp counts more threads than cores and throttles the spin-waits of
every team, the batch workers' included (forward passes measured 20-35 % slower on 2 cores).
A daemon whose model set changes at run time loads at any time, so the loader cannot simply
be shut down after the first round: it ends whenever its queue is empty.

Why one thread per device (``DeviceLoaders`` keeps one ``LoadThread`` for each): a device takes
one load at a time, in configured order; loads onto different devices may overlap only in
their streamed reads, because transformers' loading patches process globals (see
globalstate.py and loader.py's ``LOAD_LOCK`` stretches).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from modelcache.daemon.errors import ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Delay before retry number ``failures`` (1 = after the first failure): initial,
    doubling, at most ``maximum`` seconds."""

    initial: float = 5.0
    maximum: float = 300.0

    def delay(self, failures: int) -> float:
        return float(min(self.maximum, self.initial * 2 ** max(0, failures - 1)))


class LoadThread:
    """Runs ``job(item)`` for queued items, one at a time, on a thread that exists only while
    the queue is not empty. ``job`` must not raise (the registry's catches everything); if it
    does anyway, the thread logs it and goes on with the next item. ``on_exit`` runs on the
    thread as it ends, after it stopped counting as busy (so of several loaders ending at
    once, the last to end sees every one idle)."""

    def __init__(
        self,
        job: Callable[[str], None],
        name: str = "modelcache-loader",
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        self._job, self._name, self._on_exit = job, name, on_exit
        self._lock = threading.Lock()
        self._queue: deque[str] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, item: str) -> bool:
        """Queue ``item``; False when closed. Raises RuntimeError, queueing nothing, when no
        thread can start (a pids limit): the loader is not left marked busy for ever."""
        with self._lock:
            if self._closed:
                return False
            self._queue.append(item)
            if self._thread is None:
                thread = threading.Thread(target=self._main, name=self._name, daemon=True)
                try:
                    thread.start()  # it waits for this lock before looking at the queue
                except RuntimeError:
                    self._queue.pop()
                    raise
                self._thread = thread
        return True

    def close(self) -> list[str]:
        """Stop taking work; return the items that will now never run."""
        with self._lock:
            self._closed = True
            dropped = list(self._queue)
            self._queue.clear()
        return dropped

    def busy(self) -> bool:
        with self._lock:
            return self._thread is not None

    def join(self, timeout: float | None = None) -> None:
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _main(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._thread = None  # not busy from here: see on_exit
                    break
                item = self._queue.popleft()
            try:
                self._job(item)
            except BaseException:  # never let one item end the loop with work queued
                log.exception("load of %s raised out of the loader", item)
        if self._on_exit is not None:
            try:
                self._on_exit()
            except Exception:
                log.exception("the loader's exit hook failed")


def device_lane(device: str) -> str:
    """The loader of a device string: ``cuda`` and ``cuda:0`` are one GPU."""
    return "cuda:0" if device == "cuda" else device


class DeviceLoaders:
    """One ``LoadThread`` per device (made on first use), closed together, and listeners
    called when the last of them has ended (no device has a load queued or running)."""

    def __init__(self, job: Callable[[str, str], None]) -> None:
        """``job(lane, item)`` runs an item on the loader of ``lane``."""
        self._job = job
        self._lock = threading.Lock()
        self._threads: dict[str, LoadThread] = {}
        self._closed = False
        self._idle_listeners: list[Callable[[], None]] = []

    def add_idle_listener(self, listener: Callable[[], None]) -> None:
        self._idle_listeners.append(listener)

    def submit(self, lane: str, item: str) -> None:
        """Queue ``item`` on ``lane``'s loader. Raises ModelLoadError once closed, or when
        no thread can start (a pids limit)."""
        closed = ModelLoadError("internal", "the daemon is shutting down")
        with self._lock:
            if self._closed:
                raise closed
            loader = self._threads.get(lane)
            if loader is None:
                loader = LoadThread(
                    functools.partial(self._job, lane),
                    name=f"modelcache-loader-{lane}",
                    on_exit=self._ended,
                )
                self._threads[lane] = loader
        try:
            queued = loader.submit(item)
        except RuntimeError as exc:
            raise ModelLoadError("internal", f"cannot start a loader thread: {exc}") from None
        if not queued:
            raise closed

    def busy(self) -> bool:
        with self._lock:
            loaders = list(self._threads.values())
        return any(loader.busy() for loader in loaders)

    def close(self) -> list[str]:
        """Stop taking work; return the items that will now never run."""
        with self._lock:
            self._closed = True
            loaders = list(self._threads.values())
        return [item for loader in loaders for item in loader.close()]

    def _ended(self) -> None:
        if not self.busy():
            for listener in list(self._idle_listeners):
                try:
                    listener()
                except Exception:  # one broken listener must not skip the others
                    log.exception("loader idle listener failed")


class RetryTimers:
    """One pending timer per key; a new schedule or a cancel replaces the old one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._timers: dict[str, threading.Timer] = {}
        self._closed = False

    def schedule(self, key: str, delay: float, fire: Callable[[], None]) -> None:
        timer = threading.Timer(delay, fire)
        timer.daemon = True
        timer.name = f"modelcache-retry-{key}"
        with self._lock:
            if self._closed:
                return
            old = self._timers.pop(key, None)
            self._timers[key] = timer
        if old is not None:
            old.cancel()
        timer.start()

    def cancel(self, key: str) -> None:
        with self._lock:
            old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            timers, self._timers = list(self._timers.values()), {}
        for t in timers:
            t.cancel()
