"""kopf handlers: thin wrappers that run one convergence and report it.

create, update, resume and the status timer all call ``Reconciler.converge``; the handlers
only translate its outcome into a status patch, Events and metrics, and API errors into
kopf retries. Operator-wide settings (peering, persistence, Events, the metrics endpoint)
are set once, in the startup handler.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import random
import threading
import time
from collections.abc import Mapping
from typing import Any

import kopf
import kubernetes
from kubernetes.client.exceptions import ApiException
from prometheus_client import start_http_server

from modelcache.metrics import (
    MODELCACHE_READY,
    OPERATOR_BUILD_INFO,
    OPERATOR_MANAGED,
    OPERATOR_REGISTRY,
    RECONCILE,
    RECONCILE_DURATION,
    python_version,
)
from modelcache.operator.kubeapi import Kube
from modelcache.operator.reconcile import Reconciler
from modelcache.operator.settings import OperatorSettings
from modelcache.operator.spec import GROUP, PLURAL, VERSION

_STATUS_INTERVAL = OperatorSettings().status_interval  # kopf needs it at registration
# (namespace, name) -> phase, for the modelcache_operator_modelcaches gauge and the
# per-resource modelcache_operator_modelcache_ready gauge. Handlers run in
# several threads: the lock keeps the dict and the gauge consistent, and series are set or
# removed one by one (never cleared), so a scrape cannot catch the gauge half-written.
_phases: dict[tuple[str, str], str] = {}
_published: set[tuple[str, str]] = set()
_phases_lock = threading.Lock()
# uids of ModelCaches seen deleted (insertion-ordered, the oldest forgotten past a bound): a
# status tick that started before the deletion must not publish their series again.
_deleted: dict[str, None] = {}
_DELETED_KEPT = 10_000
# The process's start: kopf may be restarted in-process (__main__), and a restart must not
# make this replica junior to ones that started after the process did.
_PROCESS_STARTED = time.time()
_metrics_started = False


def seniority_priority(now: float | None = None) -> int:
    """A peering priority that is higher the earlier the process started (ms resolution,
    random tie-break): the running replica keeps the lead when another one starts."""
    ms = int((time.time() if now is None else now) * 1000)
    return (10**13 - ms) * 1000 + random.randrange(1000)  # a tie-break, not a secret


def _configure_kopf(settings: kopf.OperatorSettings, ops: OperatorSettings) -> None:
    settings.peering.name = ops.peering_name
    settings.peering.mandatory = True
    settings.peering.standalone = False
    settings.peering.lifetime = ops.peering_lifetime
    settings.peering.priority = (
        ops.peering_priority
        if ops.peering_priority is not None
        else seniority_priority(_PROCESS_STARTED)
    )
    settings.posting.enabled = True
    settings.posting.reporting_component = "modelcache-operator"
    settings.posting.reporting_instance = ops.identity
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Kubernetes 1.20 has no streaming lists: keep settings.watching.initial_streaming off.
    settings.watching.server_timeout = 300
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.execution.max_workers = 8


@kopf.on.startup(backoff=2)  # an API server still starting up: retry soon, not in 60 s
def startup(
    settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    ops = OperatorSettings()
    _configure_kopf(settings, ops)
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
    kube = Kube(kubernetes.client.ApiClient())
    memo.reconciler = Reconciler(kube, ops)
    memo.diffbase = settings.persistence.diffbase_storage
    for namespace in memo.get("namespaces") or [None]:
        if kube.ensure_peering(ops.peering_name, namespace):
            logger.info(
                "created peering object %s in %s", ops.peering_name, namespace or "the cluster"
            )
    global _metrics_started
    if ops.metrics_port and not _metrics_started:  # once per process, not per kopf run
        start_http_server(ops.metrics_port, ops.metrics_host, registry=OPERATOR_REGISTRY)
        _metrics_started = True
    OPERATOR_BUILD_INFO.labels(
        importlib.metadata.version("modelcache"),
        importlib.metadata.version("kopf"),
        python_version(),
    ).set(1)
    logger.info(
        "operator %s: peering %r priority %d, status every %.1fs",
        ops.identity,
        ops.peering_name,
        settings.peering.priority,
        ops.status_interval,
    )


def _publish_phase(
    namespace: str, name: str, phase: str | None, body: kopf.Body | None = None
) -> None:
    """Set (or with ``None`` remove) one ModelCache's phase in the gauges. With ``body``,
    an object being deleted, or already deleted (its uid seen in a DELETED event), is
    removed instead: a timer tick that ends after the deletion must not bring its series
    back (both sides decide under the lock)."""
    with _phases_lock:
        if body is not None and (
            body.metadata.get("deletionTimestamp") or body.metadata.get("uid") in _deleted
        ):
            phase = None
        if phase is None:
            if _phases.pop((namespace, name), None) is not None:
                MODELCACHE_READY.remove(namespace, name)
        else:
            _phases[(namespace, name)] = phase
            MODELCACHE_READY.labels(namespace, name).set(1 if phase == "Ready" else 0)
        counts: dict[tuple[str, str], int] = {}
        for (ns, _), p in _phases.items():
            counts[(ns, p)] = counts.get((ns, p), 0) + 1
        for gone in _published - counts.keys():
            OPERATOR_MANAGED.remove(*gone)
        for (ns, p), n in counts.items():
            OPERATOR_MANAGED.labels(ns, p).set(n)
        _published.clear()
        _published.update(counts)


def _patch_status(patch: kopf.Patch, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    if dict(old) == dict(new):
        return
    for key, value in new.items():
        patch.status[key] = value
    for key in old:
        if key not in new:
            patch.status[key] = None


def _object_lock(memo: kopf.Memo) -> threading.Lock:
    """One lock per ModelCache (kopf gives each object its own memo, shared by its handlers
    and its timer): a converge never observes the children while another one in this
    process is writing them."""
    lock: threading.Lock = memo.setdefault("converge_lock", threading.Lock())  # atomic
    return lock


def _snapshot(body: kopf.Body, memo: kopf.Memo) -> dict[str, Any]:
    """The object as this process knows it best, frozen for one converge.

    kopf swaps the live body's contents on every watch event, so it is copied once. kopf
    runs the timer beside the change handlers and applies each one's status patch only
    after it returns: a tick can start after an update handler converged but before its
    patch lands, holding the older status. Reading that as ``previous`` would write
    observedGeneration (and the conditions) back to the old generation, and the timer only
    re-applies once observedGeneration matches, so it would stay stale. The status this
    process computed last (kept in the memo) is used instead when it is at least as new.
    """
    snap: dict[str, Any] = copy.deepcopy({key: body[key] for key in body})
    stored = snap.get("status") or {}
    last: dict[str, Any] | None = memo.get("last_status")
    if last is not None and (last.get("observedGeneration") or 0) >= (
        stored.get("observedGeneration") or 0
    ):
        snap["status"] = copy.deepcopy(last)
    return snap


def _handler_pending(body: kopf.Body, memo: kopf.Memo) -> bool:
    """Whether kopf will still call a create/update handler for this body: by kopf's own
    rule, when the essence it last handled (the diff-base annotation) differs from now."""
    storage: kopf.DiffBaseStorage | None = memo.get("diffbase")
    if storage is None:
        return True
    last = storage.fetch(body=body)
    return last is None or last != storage.build(body=body)


def _converge(handler: str, body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo) -> None:
    lock = _object_lock(memo)
    if handler == "timer":
        if not lock.acquire(blocking=False):  # a handler is converging: it reports
            RECONCILE.labels(handler, "busy").inc()
            return
    else:
        lock.acquire()
    try:
        _converge_locked(handler, body, patch, memo)
    finally:
        lock.release()


def _converge_locked(handler: str, body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo) -> None:
    if not _not_deleted(body.metadata.get("uid")):
        return  # a tick that started as the object went: never re-create its children
    snap = _snapshot(body, memo)
    apply = True
    if handler == "timer":
        # Once the handlers have applied the current generation the timer re-applies the
        # children too (recreating one someone deleted); before that it only observes, so
        # it never races a create/update handler that is applying a newer spec. When kopf
        # will call no handler for this body (a spec edited and reverted within one batch
        # bumps the generation and changes nothing), the timer catches up itself.
        handled = (snap.get("status") or {}).get("observedGeneration") == snap["metadata"].get(
            "generation"
        )
        apply = handled or not _handler_pending(body, memo)
    started, result = time.monotonic(), "retry"
    try:
        outcome = memo.reconciler.converge(snap, apply=apply)
        result = "permanent_error" if outcome.rejected else "success"
    except ApiException as exc:
        delay = 30 if exc.status in (401, 403) else 5
        raise kopf.TemporaryError(
            f"Kubernetes API {exc.status} {exc.reason}: {(exc.body or '')[:300]}", delay=delay
        ) from exc
    finally:
        RECONCILE.labels(handler, result).inc()
        RECONCILE_DURATION.labels(handler).observe(time.monotonic() - started)
    status = outcome.status.to_patch()
    memo["last_status"] = status
    _patch_status(patch, body.get("status") or {}, status)
    for event in outcome.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
    _publish_phase(
        body.metadata.namespace or "", body.metadata.name or "", outcome.status.phase, body
    )


@kopf.on.create(GROUP, VERSION, PLURAL)
def created(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    _converge("create", body, patch, memo)


@kopf.on.update(GROUP, VERSION, PLURAL)
def updated(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    _converge("update", body, patch, memo)


@kopf.on.resume(GROUP, VERSION, PLURAL)
def resumed(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    _converge("resume", body, patch, memo)


def _not_deleted(uid: str | None, **_: Any) -> bool:
    """The timer's filter. Without a finalizer a ModelCache is gone at once: no event ever
    shows it with a deletionTimestamp, which is what kopf stops timers on, so its timer
    would tick on the last body for ever and re-create the children the garbage collector
    removes (seen on the node: Deployments re-created every few seconds, pods never gone).
    kopf re-evaluates daemon filters on every event, the DELETED one included, after the
    ``deleted`` handler below has recorded the uid: the timer stops there."""
    with _phases_lock:
        return (uid or "") not in _deleted


@kopf.timer(
    GROUP,
    VERSION,
    PLURAL,
    interval=_STATUS_INTERVAL,
    initial_delay=_STATUS_INTERVAL,
    when=_not_deleted,
)
def refresh(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Status from reality (and the children re-applied once the handlers are done)."""
    _converge("timer", body, patch, memo)


def _no_finalizer_for_the_timer(registry: Any) -> None:
    """No finalizer on ModelCaches: children go by owner references (garbage collection) and
    nothing else needs the operator at deletion, so a ModelCache (or its namespace) must be
    deletable when no operator runs — after ``helm uninstall``, say. kopf makes a finalizer
    mandatory for any timer (to stop it before the object goes, kopf issue #1074); ours is
    stopped by its ``when`` filter once the DELETED event is seen (``_not_deleted``), and
    this registry holds it without the requirement (kopf pinned: 1.45.2;
    tests/test_operator_handlers.py checks it)."""
    spawning = registry._spawning
    spawning._handlers = [
        dataclasses.replace(h, requires_finalizer=False) if getattr(h, "fn", None) is refresh else h
        for h in spawning._handlers
    ]


_no_finalizer_for_the_timer(kopf.get_default_registry())


@kopf.on.event(GROUP, VERSION, PLURAL, when=lambda type, **_: type == "DELETED")
def deleted(
    type: str | None,
    name: str,
    namespace: str | None,
    uid: str | None,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Children go with the ModelCache through their owner references (garbage collection);
    only the operator's own bookkeeping is left to drop."""
    if type != "DELETED":
        return
    with _phases_lock:
        _deleted[uid or ""] = None
        while len(_deleted) > _DELETED_KEPT:
            del _deleted[next(iter(_deleted))]
    _publish_phase(namespace or "", name, None)
    RECONCILE.labels("delete", "success").inc()
    logger.info("ModelCache deleted; its children are garbage-collected")


@kopf.on.probe(id="modelcaches")
def managed_count(**_: Any) -> int:
    with _phases_lock:
        return len(_phases)
