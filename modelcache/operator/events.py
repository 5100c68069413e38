"""Which Kubernetes Events a status change deserves: pure, compared old against new.

Events are for transitions a user acts on or waits for (a model became Ready and how long it
took, a model failed and why, the phase changed), not for every refresh: status refreshes
every few seconds, an Event is posted only when something changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelcache.operator.aggregate import DEGRADED, DOWNLOADING, FAILED, LOADING, READY
from modelcache.operator.status import CacheStatus

MAX_MESSAGE = 1000
_WARNING_PHASES = {"Degraded", "Failed"}


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


def _bytes(n: int | None) -> str:
    if not n:
        return "size unknown"
    value, units = float(n), ["B", "KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{n} B" if units[0] == "B" else f"{value:.1f} {units[0]}"


def _model_event(name: str, new: Mapping[str, Any]) -> Event | None:
    state = new.get("state")
    if state == READY:
        seconds = new.get("loadSeconds")
        took = f" in {seconds:.2f}s" if isinstance(seconds, int | float) else ""
        fp = (new.get("fingerprint") or "")[:16]
        return Event(
            "Normal",
            "ModelReady",
            f"model {name} ready{took} on {new.get('readyReplicas')} replicas "
            f"({new.get('device')}, {new.get('dtype')}, "
            f"{_bytes(new.get('weightBytes'))}, fingerprint {fp})",
        )
    if state in (FAILED, DEGRADED):
        cls = new.get("errorClass") or "error"
        return Event(
            "Warning",
            "ModelFailed" if state == FAILED else "ModelDegraded",
            f"model {name} {state.lower()} ({cls}): {new.get('error')}",
        )
    if state == DOWNLOADING:
        return Event("Normal", "ModelDownloading", f"model {name}: downloading")
    if state == LOADING:
        return Event("Normal", "ModelLoading", f"model {name}: loading")
    return None


def transitions(previous: Mapping[str, Any], new: CacheStatus) -> list[Event]:
    """Events for what changed between the stored status and the new one."""
    out: list[Event] = []
    after = new.to_patch()
    before_models = {m.get("name"): m for m in previous.get("models") or []}
    for m in after.get("models", []):
        old = before_models.get(m["name"]) or {}
        if old.get("state") != m["state"]:
            event = _model_event(m["name"], m)
            if event is not None:
                out.append(event)
    old_phase = previous.get("phase")
    if old_phase != new.phase:
        ready = new.condition("Ready")
        detail = ready.message if ready is not None and ready.message else ""
        kind = "Warning" if new.phase in _WARNING_PHASES else "Normal"
        out.append(
            Event(
                kind,
                new.phase,
                f"phase {old_phase or 'unset'} -> {new.phase}" + (f": {detail}" if detail else ""),
            )
        )
    return [Event(e.type, e.reason, e.message[:MAX_MESSAGE]) for e in out]
