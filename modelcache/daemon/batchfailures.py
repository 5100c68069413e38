"""How the batch worker answers a failed batch (the kinds are devicefaults.py's).

A mixin of ``Batcher`` (batcher.py), kept apart because it is the one part of the worker
whose rules are subtle: the order of retries, what a lone sequence's OOM means, and that a
lost device takes every waiting request with it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from modelcache.daemon import devicefaults
from modelcache.daemon.batchjobs import ComputeFailed, DeviceLost, TooLarge, _Seq
from modelcache.metrics import BATCH_OOM, DEVICE_FAILURES

log = logging.getLogger("modelcache.daemon.batcher")


class FailureRecovery:
    name: str
    device_lost: str
    _cond: threading.Condition
    _pending: list[_Seq]
    _depth: Any

    def _execute(self, batch: list[_Seq]) -> None:
        raise NotImplementedError

    def _recover(self, batch: list[_Seq], kind: devicefaults.Kind, error: str, trace: str) -> None:
        """A failed batch, after its exception is gone: split on OOM, stop on a lost
        device, else recompute request by request (see the module's docstring)."""
        live = [s for s in batch if not s.job.cancelled and not s.job.future.done()]
        jobs = list(dict.fromkeys(s.job for s in live))
        tokens = len(batch) * max(s.length for s in batch)
        if kind == "fatal":
            log.critical(
                "model %s: device failure in a batch of %d tokens:\n%s", self.name, tokens, trace
            )
            self._lose_device(batch, error)
            return
        if kind == "oom":
            devicefaults.release_cached_memory()
            if len(live) > 1:
                BATCH_OOM.labels(self.name, "split").inc()
                log.warning(
                    "model %s: out of memory on %d sequences (%d padded tokens); splitting",
                    self.name,
                    len(batch),
                    tokens,
                )
                half = len(live) // 2
                for part in (live[:half], live[half:]):
                    if not self._after_loss(part):
                        self._execute(part)
            elif live:
                BATCH_OOM.labels(self.name, "too_large").inc()
                s = live[0]
                s.job.fail(
                    TooLarge(
                        f"model {self.name}: sequence {s.index} of the request has "
                        f"{s.length} tokens, more than fit in the device's memory even "
                        f"alone ({error}); send shorter sequences"
                    )
                )
            return
        log.error(
            "model %s: batch of %d sequences from %d requests failed:\n%s",
            self.name,
            len(batch),
            len(jobs),
            trace,
        )
        if len(jobs) == 1:
            jobs[0].fail(ComputeFailed(error))
        elif jobs:
            # One request may have caused it (an input the model cannot take): compute each
            # request alone, so that only the requests that fail on their own get the error.
            for job in jobs:
                part = [s for s in live if s.job is job]
                if not job.cancelled and not job.future.done() and not self._after_loss(part):
                    self._execute(part)

    def _after_loss(self, part: list[_Seq]) -> bool:
        """Whether the device was lost meanwhile (by an earlier retry of this batch): then
        nothing more runs on the poisoned context, and ``part`` fails with the same reason."""
        if not self.device_lost:
            return False
        for s in part:
            if not s.job.future.done():
                s.job.fail(DeviceLost(self.device_lost))
        return True

    def _lose_device(self, batch: list[_Seq], error: str) -> None:
        """Fail everything with DeviceLost and refuse what comes; the worker then ends and
        the watchdog stops the process (health.py)."""
        reason = (
            f"model {self.name}: its device failed ({error}); the CUDA context cannot be "
            "trusted any more and the daemon is restarting"
        )
        DEVICE_FAILURES.labels(self.name).inc()
        with self._cond:
            self.device_lost = reason
            pending, self._pending = self._pending, []
            self._depth.set(0)
        for s in [*batch, *pending]:
            s.job.fail(DeviceLost(reason))
