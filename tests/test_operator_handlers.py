"""The kopf handlers' own rules, without a cluster: what a status tick may write, and when it
stands aside. kopf runs timers beside the change handlers, each patching on its own, so a
tick can hold a body older than the status an update handler has just written."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import kopf

from modelcache.metrics import OPERATOR_REGISTRY
from modelcache.operator import handlers
from modelcache.operator.reconcile import Outcome
from modelcache.operator.spec import GROUP
from modelcache.operator.status import CacheStatus, Condition


class _Reconciler:
    """Stands in for the cluster-facing Reconciler: answers a fixed status, records calls."""

    def __init__(self, status: CacheStatus, gate: threading.Event | None = None) -> None:
        self.status = status
        self.calls: list[bool] = []
        self.previous: list[dict[str, Any]] = []  # the status each converge started from
        self.gate = gate
        self.entered = threading.Event()

    def converge(self, body: Any, apply: bool = True) -> Outcome:
        self.calls.append(apply)
        self.previous.append(dict(body.get("status") or {}))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        return Outcome(self.status)


def _body(
    name: str,
    status: dict[str, Any],
    generation: int = 2,
    spec: dict[str, Any] | None = None,
    **meta: Any,
) -> kopf.Body:
    raw = {
        "metadata": {
            "name": name,
            "namespace": "t-handlers",
            "uid": f"uid-{name}",
            "generation": generation,
            **meta,
        },
        "spec": spec or {},
        "status": status,
    }
    return kopf.Body(raw)  # type: ignore[arg-type]


def _ready(name: str) -> float | None:
    return OPERATOR_REGISTRY.get_sample_value(
        "modelcache_operator_modelcache_ready", {"namespace": "t-handlers", "name": name}
    )


def _busy() -> float:
    return (
        OPERATOR_REGISTRY.get_sample_value(
            "modelcache_operator_reconcile_total", {"handler": "timer", "result": "busy"}
        )
        or 0.0
    )


def test_a_tick_whose_body_is_older_than_the_handlers_status_starts_from_that_status() -> None:
    # kopf applies the update handler's patch after the handler returns, and runs the timer
    # beside it: the tick's body can still carry generation 1's status.
    stale = {"phase": "Degraded", "observedGeneration": 1, "configHash": "old"}
    applied = CacheStatus(
        phase="Progressing",
        observed_generation=2,
        config_hash="new",
        conditions=(
            Condition(
                type="Progressing", status="True", reason="RollingOut", observed_generation=2
            ),
        ),
    )
    memo = kopf.Memo(reconciler=_Reconciler(applied))
    handlers.updated(body=_body("tick", stale), patch=kopf.Patch(), memo=memo)
    patch = kopf.Patch()
    handlers.refresh(body=_body("tick", stale), patch=patch, memo=memo)
    assert memo.reconciler.calls == [True, True]  # generation 2 is handled: it may apply
    previous = memo.reconciler.previous[1]
    assert (previous["observedGeneration"], previous["configHash"]) == (2, "new")
    assert previous["conditions"][0]["observedGeneration"] == 2
    assert patch["status"]["observedGeneration"] == 2  # never written back to 1


def test_a_tick_only_observes_until_the_generation_is_handled() -> None:
    observed = CacheStatus(phase="Loading", observed_generation=1)
    memo = kopf.Memo(reconciler=_Reconciler(observed))
    handlers.refresh(
        body=_body("new-spec", {"observedGeneration": 1}), patch=kopf.Patch(), memo=memo
    )
    assert memo.reconciler.calls == [False]
    handlers.refresh(
        body=_body("same-spec", {"observedGeneration": 2}), patch=kopf.Patch(), memo=memo
    )
    assert memo.reconciler.calls == [False, True]


def test_a_handler_that_applied_writes_observed_generation() -> None:
    applied = CacheStatus(phase="Progressing", observed_generation=2, config_hash="new")
    memo = kopf.Memo(reconciler=_Reconciler(applied))
    patch = kopf.Patch()
    old = {"phase": "Degraded", "observedGeneration": 1, "configHash": "old"}
    handlers.updated(body=_body("update", old), patch=patch, memo=memo)
    assert memo.reconciler.calls == [True]
    assert patch["status"]["observedGeneration"] == 2
    assert patch["status"]["configHash"] == "new"


def test_a_tick_stands_aside_while_a_handler_converges_the_same_object() -> None:
    gate = threading.Event()
    slow = _Reconciler(CacheStatus(phase="Progressing", observed_generation=2), gate)
    memo = kopf.Memo(reconciler=slow)
    body = _body("busy", {"observedGeneration": 1})
    worker = threading.Thread(
        target=handlers.updated, kwargs={"body": body, "patch": kopf.Patch(), "memo": memo}
    )
    worker.start()
    try:
        assert slow.entered.wait(10)
        before = _busy()
        tick_patch = kopf.Patch()
        handlers.refresh(body=body, patch=tick_patch, memo=memo)
        assert slow.calls == [True]  # the tick did not observe mid-apply
        assert not tick_patch and _busy() == before + 1
    finally:
        gate.set()
        worker.join(10)
    # Once the handler is done, the next tick runs, from the status the handler computed.
    handlers.refresh(body=body, patch=kopf.Patch(), memo=memo)
    assert slow.calls == [True, True] and slow.previous[1]["observedGeneration"] == 2


def test_another_objects_tick_is_not_held_up() -> None:
    gate = threading.Event()
    memo_a = kopf.Memo(reconciler=_Reconciler(CacheStatus(phase="Loading"), gate))
    memo_b = kopf.Memo(reconciler=_Reconciler(CacheStatus(phase="Ready")))
    worker = threading.Thread(
        target=handlers.updated,
        kwargs={"body": _body("a", {}), "patch": kopf.Patch(), "memo": memo_a},
    )
    worker.start()
    try:
        assert memo_a.reconciler.entered.wait(10)
        handlers.refresh(
            body=_body("b", {"observedGeneration": 2}), patch=kopf.Patch(), memo=memo_b
        )
        assert memo_b.reconciler.calls == [True]
    finally:
        gate.set()
        worker.join(10)


def test_a_tick_that_ends_after_the_delete_does_not_bring_the_series_back() -> None:
    memo = kopf.Memo(reconciler=_Reconciler(CacheStatus(phase="Ready")))
    handlers.refresh(body=_body("gone", {"observedGeneration": 2}), patch=kopf.Patch(), memo=memo)
    assert _ready("gone") == 1.0
    uid = _body("gone", {})["metadata"]["uid"]
    handlers.deleted(
        type="DELETED", name="gone", namespace="t-handlers", uid=uid, logger=logging.getLogger("t")
    )
    assert _ready("gone") is None
    deleting = _body("gone", {"observedGeneration": 2}, deletionTimestamp="2026-11-23T00:00:00Z")
    handlers.refresh(body=deleting, patch=kopf.Patch(), memo=memo)
    assert _ready("gone") is None
    # No finalizer: a tick that began before the deletion holds a body without a
    # deletionTimestamp, and still must not bring the series back, nor touch the children.
    calls = len(memo.reconciler.calls)
    handlers.refresh(body=_body("gone", {"observedGeneration": 2}), patch=kopf.Patch(), memo=memo)
    assert _ready("gone") is None
    assert len(memo.reconciler.calls) == calls
    # The decision is taken under the gauges' lock, from the live body.
    handlers._publish_phase("t-handlers", "gone", "Ready", deleting)
    assert _ready("gone") is None


def _handled(storage: kopf.DiffBaseStorage, handled_spec: dict[str, Any], **body: Any) -> kopf.Body:
    """The body as kopf leaves it once its handlers handled ``handled_spec``: with the
    diff-base annotation of that spec (the body's own spec may differ)."""
    essence = storage.build(body=_body(**{**body, "spec": handled_spec}))
    key = f"{GROUP}/last-handled-configuration"
    return _body(**body, annotations={key: json.dumps(essence)})


def test_a_tick_catches_up_a_generation_no_handler_will_be_called_for() -> None:
    """A spec edited and reverted within one kopf batch: the generation moves on, kopf sees
    no change and calls no handler; the timer must not stay observe-only for ever."""
    storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
    stale = {"observedGeneration": 1}
    reverted = _handled(
        storage,
        {"models": ["a"]},
        name="reverted",
        status=stale,
        generation=3,
        spec={"models": ["a"]},
    )
    memo = kopf.Memo(reconciler=_Reconciler(CacheStatus(phase="Ready")), diffbase=storage)
    handlers.refresh(body=reverted, patch=kopf.Patch(), memo=memo)
    assert memo.reconciler.calls == [True]

    # The update handler has not run yet for the edited spec: observe only.
    edited = _handled(
        storage,
        {"models": ["a"]},
        name="edited",
        status=stale,
        generation=2,
        spec={"models": ["b"]},
    )
    memo = kopf.Memo(reconciler=_Reconciler(CacheStatus(phase="Ready")), diffbase=storage)
    handlers.refresh(body=edited, patch=kopf.Patch(), memo=memo)
    assert memo.reconciler.calls == [False]


def test_no_handler_puts_a_finalizer_on_modelcaches() -> None:
    """A ModelCache (and its namespace) stays deletable with no operator running: neither the
    status timer nor any change handler makes kopf add its finalizer."""
    import kopf

    registry = kopf.get_default_registry()
    timers = [h for h in registry._spawning.get_all_handlers() if h.fn is handlers.refresh]
    assert len(timers) == 1 and timers[0].requires_finalizer is False
    # What stops the timer instead: its filter, re-evaluated by kopf on the DELETED event
    # after the `deleted` handler recorded the uid.
    when = timers[0].when
    assert when is not None and when(uid="uid-not-deleted-yet") is True
    handlers.deleted(
        type="DELETED", name="x", namespace="t", uid="uid-deleted", logger=logging.getLogger("t")
    )
    assert when(uid="uid-deleted") is False
    assert not any(h.requires_finalizer for h in registry._spawning.get_all_handlers())
    assert not any(h.requires_finalizer for h in registry._changing.get_all_handlers())
