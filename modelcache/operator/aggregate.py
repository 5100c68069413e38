"""One model's status across replicas: the replica-disagreement policy, in one pure function.

Each current pod that answered ListModels contributes one report per model. Clients spread
requests over every ready pod (headless Service, client-side balancing), so a model counts
as Ready only when every answering pod serves it, and with the same weights: a fingerprint
mismatch between Ready pods is surfaced as Degraded instead of being averaged away.
A model Ready on some pods and Failed on others is Degraded, with the failing pods named.
Without answers, the state comes from the pods' stages (download running or failed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from modelcache.operator.pods import PodView

PENDING, DOWNLOADING, LOADING, READY, DEGRADED, FAILED = (
    "Pending",
    "Downloading",
    "Loading",
    "Ready",
    "Degraded",
    "Failed",
)


class ModelStatus(BaseModel):
    """One entry of ``status.models[]``."""

    model_config = ConfigDict(
        frozen=True, alias_generator=to_camel, populate_by_name=True, extra="ignore"
    )

    name: str
    state: str
    ready_replicas: str | None = None
    load_seconds: float | None = None
    weight_bytes: int | None = None
    device: str | None = None
    dtype: str | None = None
    fingerprint: str | None = None
    revision: str | None = None
    error: str | None = None
    error_class: str | None = None
    load_failures: int | None = None
    next_retry: str | None = None  # RFC 3339: the soonest automatic retry on any replica
    pending_update: str | None = None  # a changed spec loading while the old one serves


@dataclass(frozen=True)
class ModelReport:
    """One model as one daemon's ListModels reports it (state: PENDING/LOADING/READY/FAILED)."""

    name: str
    state: str
    error: str = ""
    error_class: str = ""
    device: str = ""
    dtype: str = ""
    revision: str = ""
    fingerprint: str = ""
    weight_bytes: int = 0
    load_seconds: float | None = None
    load_failures: int = 0
    next_retry_unix: float = 0.0
    pending_update: str = ""


@dataclass(frozen=True)
class PodAnswer:
    """A pod's ListModels answer, or why the call failed."""

    pod: str
    models: tuple[ModelReport, ...] = ()
    error: str | None = None
    config_hash: str = ""  # the configuration the daemon applied last


def _details(r: ModelReport) -> dict[str, Any]:
    return {
        "device": r.device or None,
        "dtype": r.dtype or None,
        "revision": r.revision or None,
        "fingerprint": r.fingerprint or None,
        "weight_bytes": r.weight_bytes or None,
    }


def _rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(unix, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _retries(reports: Sequence[tuple[str, ModelReport]]) -> dict[str, Any]:
    """Attempts and the soonest next retry of the reports that have them."""
    failures = max((r.load_failures for _, r in reports), default=0)
    nexts = [r.next_retry_unix for _, r in reports if r.next_retry_unix > 0]
    return {
        "load_failures": failures or None,
        "next_retry": _rfc3339(min(nexts)) if nexts else None,
    }


def _errors(failed: Sequence[tuple[str, ModelReport]]) -> str:
    distinct = {r.error for _, r in failed}
    if len(distinct) == 1:
        pods = ", ".join(p for p, _ in failed)
        return f"{failed[0][1].error} (pod {pods})"
    return "; ".join(f"pod {p}: {r.error}" for p, r in failed)


def from_reports(
    name: str, reports: Sequence[tuple[str, ModelReport]], answered: int
) -> ModelStatus:
    """Combine the reports of the ``answered`` pods (a pod that omits the model is not
    serving it). See the module docstring for the policy."""
    ready = [(p, r) for p, r in reports if r.state == "READY"]
    failed = [(p, r) for p, r in reports if r.state == "FAILED"]
    loading = [r for _, r in reports if r.state == "LOADING"]
    downloading = [r for _, r in reports if r.error_class == "downloading"]
    replicas = f"{len(ready)}/{answered}"
    if failed:
        first = failed[0][1]
        if not ready:
            return ModelStatus(
                name=name,
                state=FAILED,
                ready_replicas=replicas,
                error=_errors(failed),
                error_class=first.error_class or None,
                **{**_details(first), "fingerprint": None},
                **_retries(failed),
            )
        return ModelStatus(
            name=name,
            state=DEGRADED,
            ready_replicas=replicas,
            error_class=first.error_class,
            error=f"failed on {len(failed)}/{answered} replicas, ready on {len(ready)}: "
            f"{_errors(failed)}",
            **_details(ready[0][1]),
        )
    if ready and len(ready) == answered:
        prints = {r.fingerprint for _, r in ready}
        if len(prints) > 1:
            seen = ", ".join(f"{r.fingerprint[:16]} on {p}" for p, r in ready)
            return ModelStatus(
                name=name,
                state=DEGRADED,
                ready_replicas=replicas,
                error_class="fingerprint_mismatch",
                **{**_details(ready[0][1]), "fingerprint": None},
                error=f"replicas loaded different weights (fingerprints: {seen}); check the "
                "model volume of the odd one out",
            )
        seconds = [r.load_seconds for _, r in ready if r.load_seconds is not None]
        # A changed spec loading (or failing to) while these weights keep serving.
        updating = [(p, r) for p, r in ready if r.pending_update]
        update: dict[str, Any] = {}
        if updating:
            update = {"pending_update": updating[0][1].pending_update, **_retries(updating)}
            failing = [(p, r) for p, r in updating if r.error]
            if failing:
                update["error"] = f"update failed, previous weights serve: {_errors(failing)}"
                update["error_class"] = failing[0][1].error_class or None
        return ModelStatus(
            name=name,
            state=READY,
            ready_replicas=replicas,
            load_seconds=round(max(seconds), 3) if seconds else None,
            **_details(ready[0][1]),
            **update,
        )
    if downloading and not ready and not loading:
        return ModelStatus(name=name, state=DOWNLOADING, ready_replicas=replicas)
    state = LOADING if (ready or loading) else PENDING
    return ModelStatus(name=name, state=state, ready_replicas=replicas)


def model_status(
    index: int,
    name: str,
    current: Sequence[PodView],
    answers: Mapping[str, PodAnswer],
    previous: Mapping[str, Any] | None,
) -> ModelStatus:
    """``models[index]``'s status from the answers, or else from the pods' stages."""
    reports = [(pod, r) for pod, a in answers.items() for r in a.models if r.name == name]
    if answers:
        return from_reports(name, reports, len(answers))
    for v in current:
        if v.download_failed is not None and v.download_failed[0] == index:
            return ModelStatus(
                name=name,
                state=FAILED,
                error_class="download",
                error=f"download failed on pod {v.name}: {v.download_failed[1]}",
            )
    if any(v.downloading == index for v in current):
        return ModelStatus(name=name, state=DOWNLOADING)
    if any(v.daemon_running for v in current):
        if previous:  # the daemon runs but did not answer: keep what we last knew
            return ModelStatus.model_validate(previous)
        return ModelStatus(name=name, state=LOADING)
    return ModelStatus(name=name, state=PENDING)
