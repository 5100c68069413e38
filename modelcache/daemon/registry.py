"""The set of models a daemon holds, and the only way to get one.

Guarantees (see seeds 000 and 003):
- one load per model, whatever the number of callers: every caller of ``get``/``aget``
  for a model that is not loaded waits on the same Future and receives the same object
  or the same exception;
- loads onto one device run one at a time, on that device's loader thread (loadthread.py;
  ``cpu``, ``cuda:0``, ``cuda:1``: one queue each, in configured order), and every stretch
  of a load that builds modules holds the process-wide lock in ``loader``, because
  transformers' loading patches process globals; only the streamed reads and copies of
  loads onto different devices overlap;
- a failed load is recorded, not cached forever: it is retried on a capped exponential
  backoff (``Backoff``; the attempts and the next retry are in the entry), and the next
  ``get`` retries it at once;
- transformers and every model's config and class are resolved on the main thread, in
  ``prepare()``, before any worker thread exists (the lazy-import race of seed 003); models
  added later are resolved on the loader thread, under the load lock.

The set changes at run time with ``apply(config)`` (see changes.py): added models load;
removed ones leave the registry at once (listeners hear REMOVED and drain them); a changed
model keeps its loaded weights READY while the new spec loads (``ModelEntry.update``), and
only a verified load replaces them; unchanged models are not touched. A load started for a
spec that changed meanwhile is discarded and the current spec is loaded instead.

What it says of each model is a frozen ``ModelEntry`` (entries.py), safe on any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace

from modelcache.config import DaemonConfig, ModelSpec
from modelcache.daemon.changes import ConfigChanges, diff
from modelcache.daemon.entries import Listener, ModelEntry, ModelState
from modelcache.daemon.errors import ModelLoadError
from modelcache.daemon.fetch import missing_reason
from modelcache.daemon.globalstate import LOAD_LOCK
from modelcache.daemon.loader import (
    LoadedModel,
    PreparedModel,
    count_failure,
    load_model,
    prepare_model,
)
from modelcache.daemon.loadthread import Backoff, DeviceLoaders, RetryTimers, device_lane
from modelcache.metrics import MODEL_LOADED, record_served

__all__ = ["DOWNLOAD_POLL_S", "Listener", "ModelEntry", "ModelRegistry", "ModelState"]

log = logging.getLogger(__name__)
#: Seconds between looks at a model the fetch container is still downloading.
DOWNLOAD_POLL_S = 5.0


def _prepare(spec: ModelSpec, config: DaemonConfig) -> PreparedModel:
    """prepare_model with every unexpected exception turned into a classified failure:
    a malformed config.json must fail that model, not the daemon."""
    try:
        return prepare_model(spec, config)
    except ModelLoadError:
        raise
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise ModelLoadError("bad_config", f"{type(exc).__name__}: {first}") from None


class ModelRegistry:
    def __init__(self, config: DaemonConfig, backoff: Backoff | None = None) -> None:
        """``backoff`` None: no automatic retries (``modelcache preload``)."""
        self.config = config
        self.backoff = backoff
        self._lock = threading.Lock()
        self._entries = {
            m.name: ModelEntry(spec=m, state=ModelState.PENDING) for m in config.models
        }
        self._generation = dict.fromkeys(self._entries, 0)  # bumped when the wanted spec moves
        self._prepared: dict[str, tuple[ModelSpec, PreparedModel]] = {}
        self._inflight: dict[str, Future[LoadedModel]] = {}
        self._listeners: list[Listener] = []
        self._loaders = DeviceLoaders(self._run_load)
        self._timers = RetryTimers()
        self.load_count: dict[str, int] = dict.fromkeys(self._entries, 0)

    # -- set-up, main thread only ---------------------------------------------------
    def prepare(self) -> None:
        """Resolve files, configs and classes of every model on the calling thread.

        A model that fails here is marked FAILED at once (and its retry scheduled); the
        others are unaffected.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("ModelRegistry.prepare() must run on the main thread (seed 003)")
        for spec in self.config.models:
            try:
                self._prepared[spec.name] = (spec, _prepare(spec, self.config))
            except ModelLoadError as exc:
                count_failure(spec.name, exc.error_class)
                self._failed(spec.name, self._generation[spec.name], exc)

    def add_listener(self, listener: Listener) -> None:
        """Called (from the loader thread, or the caller of ``apply``) on every state change,
        on a swap to new weights (READY again) and on removal (REMOVED)."""
        self._listeners.append(listener)

    def add_idle_listener(self, listener: Callable[[], None]) -> None:
        """Called on a loader thread whenever the last running load has ended (no loader
        of any device has work): the moment nothing is half built."""
        self._loaders.add_idle_listener(listener)

    # -- queries --------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def entry(self, name: str) -> ModelEntry:
        """Raises KeyError for a model that is not configured."""
        with self._lock:
            return self._entries[name]

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries.values())

    def ready(self, name: str) -> LoadedModel | None:
        e = self.entry(name)
        return e.loaded if e.state is ModelState.READY else None

    # -- the model set changes ------------------------------------------------------
    def apply(self, config: DaemonConfig) -> ConfigChanges:
        """Make ``config`` the configuration: see the module docstring. Loads are queued
        and run in the background; returns what changed."""
        removed: list[str] = []
        queue: list[str] = []
        with self._lock:
            changes = diff(self.config, config)
            self.config = config
            for spec in changes.added:
                self._entries[spec.name] = ModelEntry(spec=spec, state=ModelState.PENDING)
                self._generation[spec.name] = self._generation.get(spec.name, 0) + 1
                self.load_count.setdefault(spec.name, 0)
                queue.append(spec.name)
            for name in changes.removed:
                del self._entries[name]
                self._generation[name] += 1
                self._prepared.pop(name, None)
                removed.append(name)
            for spec in changes.changed:
                old = self._entries[spec.name]
                self._generation[spec.name] += 1
                if old.state is ModelState.READY:  # keep serving the old weights meanwhile
                    new = replace(old, update=spec, error="", error_class="", failures=0)
                else:
                    new = ModelEntry(spec=spec, state=ModelState.PENDING)
                self._entries[spec.name] = replace(new, next_retry=None)
                queue.append(spec.name)
        for name in removed:
            self._timers.cancel(name)
            self._notify(name, ModelState.REMOVED)
        for name in queue:
            self._timers.cancel(name)
            self.load_async(name)
        return changes

    # -- loading --------------------------------------------------------------------
    def load_async(self, name: str) -> Future[LoadedModel]:
        """The Future of the model's load; starts one only if none is running or needed."""
        with self._lock:
            entry = self._entries[name]
            if entry.state is ModelState.READY and entry.update is None and entry.loaded:
                done: Future[LoadedModel] = Future()
                done.set_result(entry.loaded)
                return done
            fut = self._inflight.get(name)
            if fut is not None:
                return fut
            fut = Future()
            # RUNNING at once: one waiter giving up (a cancelled coroutine, a timeout) must
            # not cancel the load for everybody else.
            fut.set_running_or_notify_cancel()
            self._inflight[name] = fut
        self._submit_or_fail(name, fut)
        return fut

    def get(self, name: str, timeout: float | None = None) -> LoadedModel:
        return self.load_async(name).result(timeout)

    async def aget(self, name: str) -> LoadedModel:
        return await asyncio.shield(asyncio.wrap_future(self.load_async(name)))

    def start_all(self) -> list[Future[LoadedModel]]:
        """Queue a load of every configured model (in config order) and return at once.

        Models that already failed in ``prepare()`` are left to their retry (a caller asking
        for one by name retries it at once), so a broken model is reported once, not twice.
        """
        return [
            self.load_async(n) for n in self.names() if self.entry(n).state is not ModelState.FAILED
        ]

    def load_all(self) -> list[ModelEntry]:
        """Load every model, wait, and return the final entries (failures included)."""
        for fut in self.start_all():
            with contextlib.suppress(ModelLoadError):
                fut.result()
        return self.entries()

    def idle(self) -> bool:
        """No load queued or running."""
        return not self._loaders.busy()

    def close(self) -> None:
        """Stop loading: queued loads are dropped and their waiters get an error at once;
        a load already running finishes in the background (it cannot be interrupted)."""
        self._timers.close()
        dropped = self._loaders.close()
        with self._lock:
            futures = [self._inflight.pop(n) for n in dropped if n in self._inflight]
        for fut in futures:
            if not fut.done():
                fut.set_exception(ModelLoadError("internal", "the daemon is shutting down"))

    # -- the loader threads -----------------------------------------------------------
    def _submit(self, name: str) -> None:
        """Queue a load of ``name`` on the loader of the device it is wanted on (raises
        ModelLoadError once closed, or when no loader thread can start)."""
        with self._lock:
            entry = self._entries.get(name)
        self._loaders.submit(device_lane(entry.wanted.device) if entry else "cpu", name)

    def _submit_or_fail(self, name: str, fut: Future[LoadedModel]) -> None:
        """Queue ``name`` for the waiters of ``fut``; fail them if it cannot be queued."""
        try:
            self._submit(name)
        except ModelLoadError as exc:
            with self._lock:
                self._inflight.pop(name, None)
            fut.set_exception(exc)

    def _run_load(self, lane: str, name: str) -> None:
        with self._lock:
            entry = self._entries.get(name)
            generation = self._generation.get(name, 0)
            fut = self._inflight.get(name)
        if entry is None or fut is None:  # removed while queued
            if fut is not None:
                with self._lock:
                    self._inflight.pop(name, None)
                fut.set_exception(ModelLoadError("not_found", f"model {name} was removed"))
            return
        if device_lane(entry.wanted.device) != lane:  # moved to another device while queued
            self._submit_or_fail(name, fut)
            return
        result: LoadedModel | ModelLoadError
        try:
            result = self._load(name, entry.wanted, generation)
        except ModelLoadError as exc:
            # Drop the traceback: its frames hold the half-built model and checkpoint,
            # which must be freed now (GPU memory for the retry), not at the next GC.
            result = exc.with_traceback(None)
        except BaseException as exc:  # a loader bug must fail the model, never hang callers
            log.exception("model %s: unexpected loader error", name)
            count_failure(name, "internal")
            result = ModelLoadError("internal", f"{type(exc).__name__}: {exc}")
        with self._lock:
            current = self._generation.get(name) == generation and name in self._entries
            superseded = not current and name in self._entries
            if not superseded:
                self._inflight.pop(name, None)
        if superseded:
            del result  # superseded by a newer spec: load that one, same waiters
            self._submit_or_fail(name, fut)
            return
        if not current:
            fut.set_exception(ModelLoadError("not_found", f"model {name} was removed"))
            return
        if isinstance(result, ModelLoadError):
            log.error("model %s failed to load: %s", name, result)
            self._failed(name, generation, result)
            fut.set_exception(result)
        else:
            self._ready(name, result)
            fut.set_result(result)
        del result

    def _load(self, name: str, spec: ModelSpec, generation: int) -> LoadedModel:
        prepared = self._prepared.get(name)
        if prepared is None or prepared[0] != spec:
            # Not prepared for this spec (added or changed at run time, or preparation
            # failed): resolve it now, under the load lock, so files that appeared later
            # are found on retry.
            with LOAD_LOCK:
                try:
                    prepared = (spec, _prepare(spec, self.config))
                except ModelLoadError as exc:
                    count_failure(name, exc.error_class)
                    raise
            self._prepared[name] = prepared
        with self._lock:
            entry = self._entries[name]
            if entry.update is None and self._generation[name] == generation:
                self._entries[name] = replace(
                    entry, state=ModelState.LOADING, error="", error_class="", next_retry=None
                )
        if entry.update is None:
            self._notify(name, ModelState.LOADING)
        self.load_count[name] = self.load_count.get(name, 0) + 1
        started = time.perf_counter()
        loaded = load_model(prepared[1])
        log.info(
            "model %s ready in %.2fs (fingerprint %s)",
            name,
            time.perf_counter() - started,
            loaded.fingerprint[:16],
        )
        return loaded

    def _ready(self, name: str, loaded: LoadedModel) -> None:
        self._timers.cancel(name)
        with self._lock:
            old = self._entries[name]
            self._entries[name] = ModelEntry(
                spec=old.wanted,
                state=ModelState.READY,
                loaded=loaded,
                stage_seconds=dict(loaded.stage_seconds),
            )
        record_served(name, str(loaded.device), loaded.weight_bytes)
        self._notify(name, ModelState.READY)  # also on a swap: READY with new weights

    def _failed(self, name: str, generation: int, exc: ModelLoadError) -> None:
        delay: float | None = None
        with self._lock:
            old = self._entries.get(name)
            if old is None or self._generation.get(name) != generation:
                return
            waiting, exc = missing_reason(self.config.model_root, old.wanted, exc)
            failures = old.failures + (0 if waiting else 1)
            if self.backoff is not None:
                delay = DOWNLOAD_POLL_S if waiting else self.backoff.delay(failures)
            serving = old.state is ModelState.READY  # an update failed: the old weights stay
            unserved = ModelState.PENDING if waiting else ModelState.FAILED
            self._entries[name] = replace(
                old,
                state=ModelState.READY if serving else unserved,
                loaded=old.loaded if serving else None,
                error=exc.message,
                error_class=exc.error_class,
                failures=failures,
                next_retry=time.time() + delay if delay is not None else None,
            )
        if not serving:
            MODEL_LOADED.labels(model=name).set(0)
            self._notify(name, unserved)
        if delay is not None:
            log.info("model %s: retry %d in %.0fs", name, failures + 1, delay)
            self._timers.schedule(name, delay, lambda: self._retry(name, generation))

    def _retry(self, name: str, generation: int) -> None:
        with self._lock:
            if self._generation.get(name) != generation or name not in self._entries:
                return
        self.load_async(name)

    def _notify(self, name: str, state: ModelState) -> None:
        for listener in list(self._listeners):
            try:
                listener(name, state)
            except Exception:  # a broken listener must not break loading
                log.exception("registry listener failed")
