"""The kopf handlers' own rules, without a cluster: what a status tick may write, and when it
stands aside. kopf runs timers beside the change handlers, each patching on its own, so a
tick can hold a body older than the status an update handler has just written."""

from __future__ import annotations

import logging
import threading
from typing import Any

import kopf

from modelcache.metrics import OPERATOR_REGISTRY
from modelcache.operator import handlers
from modelcache.operator.reconcile import Outcome
from modelcache.operator.status import CacheStatus


class _Reconciler:
    """Stands in for the cluster-facing Reconciler: answers a fixed status, records calls."""

    def __init__(self, status: CacheStatus, gate: threading.Event | None = None) -> None:
        self.status = status
        self.calls: list[bool] = []
        self.gate = gate
        self.entered = threading.Event()

    def converge(self, body: Any, apply: bool = True) -> Outcome:
        self.calls.append(apply)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        return Outcome(self.status)


def _body(name: str, status: dict[str, Any], generation: int = 2, **meta: Any) -> kopf.Body:
    raw = {
        "metadata": {
            "name": name,
            "namespace": "t-handlers",
            "uid": f"uid-{name}",
            "generation": generation,
            **meta,
        },
        "spec": {},
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


def test_a_tick_holding_an_old_body_never_moves_observed_generation_back() -> None:
    # The update handler has applied generation 2; the tick still sees generation 1's status.
    stale = {"phase": "Degraded", "observedGeneration": 1, "configHash": "old"}
    seen_by_tick = CacheStatus(phase="Progressing", observed_generation=1, config_hash="old")
    memo = kopf.Memo(reconciler=_Reconciler(seen_by_tick))
    patch = kopf.Patch()
    handlers.refresh(body=_body("tick", stale), patch=patch, memo=memo)
    assert memo.reconciler.calls == [False]  # observe only: the generation is not handled
    assert patch["status"]["phase"] == "Progressing"
    assert "observedGeneration" not in patch["status"]
    assert "configHash" not in patch["status"]


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
    # Once the handler is done, the next tick runs.
    handlers.refresh(body=body, patch=kopf.Patch(), memo=memo)
    assert slow.calls == [True, False]


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
    handlers.deleted(name="gone", namespace="t-handlers", logger=logging.getLogger("t"))
    assert _ready("gone") is None
    deleting = _body("gone", {"observedGeneration": 2}, deletionTimestamp="2026-11-23T00:00:00Z")
    handlers.refresh(body=deleting, patch=kopf.Patch(), memo=memo)
    assert _ready("gone") is None
