"""The batcher's data: requests (jobs), their sequences, why one failed, and which
sequences form the next batch. Pure and thread-agnostic; batcher.py owns the locking."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any


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


class TooLarge(BatchError):
    """A sequence that does not fit in the device's memory even alone."""


class DeviceLost(BatchError):
    """The model's device failed in a way only a new process cures (devicefaults.py)."""


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
