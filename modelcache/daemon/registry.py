"""The set of models a daemon holds, and the only way to get one.

Guarantees (see seeds 000 and 003):
- one load per model, whatever the number of callers: every caller of ``get``/``aget``
  for a model that is not loaded waits on the same Future and receives the same object
  or the same exception;
- loads never overlap: they run one at a time on a single loader thread (and under the
  process-wide lock in ``loader``), because transformers' loading patches process
  globals;
- a failed load is recorded, not cached forever: the next ``get`` retries it;
- transformers and every model's config and class are resolved on the main thread, in
  ``prepare()``, before any worker thread exists (the lazy-import race of seed 003).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from modelcache.config import DaemonConfig, ModelSpec
from modelcache.daemon.errors import ModelLoadError
from modelcache.daemon.globalstate import LOAD_LOCK
from modelcache.daemon.loader import (
    LoadedModel,
    PreparedModel,
    count_failure,
    load_model,
    prepare_model,
)

log = logging.getLogger(__name__)


class ModelState(enum.Enum):
    PENDING = "pending"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class ModelEntry:
    """A point-in-time view of one configured model, safe to hand to other threads."""

    spec: ModelSpec
    state: ModelState
    loaded: LoadedModel | None = None
    error: str = ""
    error_class: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)


Listener = Callable[[str, ModelState], None]


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
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._entries = {
            m.name: ModelEntry(spec=m, state=ModelState.PENDING) for m in config.models
        }
        self._prepared: dict[str, PreparedModel | ModelLoadError] = {}
        self._inflight: dict[str, Future[LoadedModel]] = {}
        self._listeners: list[Listener] = []
        self._running: set[str] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelcache-loader")
        self.load_count: dict[str, int] = {m.name: 0 for m in config.models}

    # -- set-up, main thread only ---------------------------------------------------
    def prepare(self) -> None:
        """Resolve files, configs and classes of every model on the calling thread.

        A model that fails here is marked FAILED at once; the others are unaffected.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("ModelRegistry.prepare() must run on the main thread (seed 003)")
        for spec in self.config.models:
            try:
                self._prepared[spec.name] = _prepare(spec, self.config)
            except ModelLoadError as exc:
                count_failure(spec.name, exc.error_class)
                self._prepared[spec.name] = exc
                self._set(
                    spec.name,
                    state=ModelState.FAILED,
                    error=exc.message,
                    error_class=exc.error_class,
                )

    def add_listener(self, listener: Listener) -> None:
        """Called (from the loader thread) on every state change, e.g. to update health."""
        self._listeners.append(listener)

    # -- queries --------------------------------------------------------------------
    def names(self) -> list[str]:
        return [m.name for m in self.config.models]

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

    # -- loading --------------------------------------------------------------------
    def load_async(self, name: str) -> Future[LoadedModel]:
        """The Future of the model's load; starts one only if none is running or done."""
        with self._lock:
            entry = self._entries[name]
            if entry.state is ModelState.READY and entry.loaded is not None:
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
        try:
            self._executor.submit(self._run_load, name, fut)
        except RuntimeError:  # executor shut down: the registry is closed
            with self._lock:
                self._inflight.pop(name, None)
            fut.set_exception(ModelLoadError("internal", "the daemon is shutting down"))
        return fut

    def get(self, name: str, timeout: float | None = None) -> LoadedModel:
        return self.load_async(name).result(timeout)

    async def aget(self, name: str) -> LoadedModel:
        return await asyncio.shield(asyncio.wrap_future(self.load_async(name)))

    def start_all(self) -> list[Future[LoadedModel]]:
        """Queue a load of every configured model (in config order) and return at once.

        Models that already failed in ``prepare()`` are left FAILED (a caller asking for one
        by name retries it) so a broken model is reported once, not twice.
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

    def close(self) -> None:
        """Stop loading: queued loads are dropped and their waiters get an error at once;
        a load already running finishes in the background (it cannot be interrupted)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            pending = [(n, f) for n, f in self._inflight.items() if n not in self._running]
            for name, _ in pending:
                self._inflight.pop(name, None)
        for _, fut in pending:
            if not fut.done():
                fut.set_exception(ModelLoadError("internal", "the daemon is shutting down"))

    def _run_load(self, name: str, fut: Future[LoadedModel]) -> None:
        result: LoadedModel | BaseException
        try:
            result = self._load(name)
        except ModelLoadError as exc:
            log.error("model %s failed to load: %s", name, exc)
            self._set(
                name,
                state=ModelState.FAILED,
                loaded=None,
                error=exc.message,
                error_class=exc.error_class,
            )
            # Drop the traceback: its frames hold the half-built model and checkpoint,
            # which must be freed now (GPU memory for the retry), not at the next GC.
            result = exc.with_traceback(None)
        except BaseException as exc:  # a loader bug must fail the model, never hang callers
            log.exception("model %s: unexpected loader error", name)
            count_failure(name, "internal")
            result = ModelLoadError("internal", f"{type(exc).__name__}: {exc}")
            self._set(
                name,
                state=ModelState.FAILED,
                loaded=None,
                error=result.message,
                error_class=result.error_class,
            )
        with self._lock:
            self._inflight.pop(name, None)
            self._running.discard(name)
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)
        del result

    def _load(self, name: str) -> LoadedModel:
        with self._lock:
            self._running.add(name)
        prepared = self._prepared.get(name)
        if prepared is None or isinstance(prepared, ModelLoadError):
            # Preparation failed (or never ran): try again now, so that a model whose
            # files appeared later can come up on retry.
            with LOAD_LOCK:
                try:
                    prepared = _prepare(self._entries[name].spec, self.config)
                except ModelLoadError as exc:
                    count_failure(name, exc.error_class)
                    raise
            self._prepared[name] = prepared
        self._set(name, state=ModelState.LOADING, error="", error_class="")
        self.load_count[name] += 1
        started = time.perf_counter()
        loaded = load_model(prepared)
        log.info(
            "model %s ready in %.2fs (fingerprint %s)",
            name,
            time.perf_counter() - started,
            loaded.fingerprint[:16],
        )
        self._set(
            name, state=ModelState.READY, loaded=loaded, stage_seconds=dict(loaded.stage_seconds)
        )
        return loaded

    def _set(self, name: str, **changes: object) -> None:
        with self._lock:
            old = self._entries[name]
            new = ModelEntry(
                spec=old.spec,
                state=changes.get("state", old.state),  # type: ignore[arg-type]
                loaded=changes.get("loaded", old.loaded),  # type: ignore[arg-type]
                error=changes.get("error", old.error),  # type: ignore[arg-type]
                error_class=changes.get("error_class", old.error_class),  # type: ignore[arg-type]
                stage_seconds=changes.get("stage_seconds", old.stage_seconds),  # type: ignore[arg-type]
            )
            self._entries[name] = new
        if new.state is not old.state:
            for listener in list(self._listeners):
                try:
                    listener(name, new.state)
                except Exception:  # a broken listener must not break loading
                    log.exception("registry listener failed")
