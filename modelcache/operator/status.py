"""A ModelCache's status, derived from what is observed: pure, so every rule is unit-tested.

Inputs are the validated spec (or why it is invalid), the Deployment, the daemon pods and each
reachable pod's ListModels answer; the output is the whole ``status``. Only pods that run the
current pod template count: an older pod mid-rollout neither makes a model Ready nor Failed.

When replicas disagree about a model (see ``aggregate``): it is Ready only if it is Ready on
every current pod that answered, because a client's requests land on any of them; Failed if
it failed everywhere; Degraded if it is Ready on some pods and Failed on others, or if Ready
pods report different fingerprints (the same checkpoint must give the same weights; a
mismatch means one node's volume holds something else). loadSeconds is the slowest replica's.

Phase, decided in this order: Failed (invalid spec, or nothing can serve because every model
or every pod failed); Degraded (something failed or a replica is missing, but something
serves); Ready (every model Ready on every desired replica, no rollout running); otherwise
the least advanced stage of the current pods: Pending, Downloading, Loading.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from modelcache.operator import aggregate
from modelcache.operator.aggregate import DEGRADED, FAILED, READY, ModelStatus, PodAnswer
from modelcache.operator.pods import PENDING, PodView, least_advanced
from modelcache.operator.spec import ModelCacheSpec

CONDITION_TYPES = ("Ready", "ModelsLoaded", "Progressing", "Degraded")
# A pod waiting on these may still start (capacity freed, a Secret created): Pending, with
# the reason, not Failed.
_NON_FATAL = {
    "Unschedulable",
    "FailedScheduling",
    "FailedMount",
    "FailedAttachVolume",
    "FailedCreatePodSandBox",
}


class _Camel(BaseModel):
    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)


class Condition(_Camel):
    type: str
    status: str
    reason: str
    message: str = ""
    last_transition_time: str = ""
    observed_generation: int | None = None


class CacheStatus(_Camel):
    phase: str
    reason: str = ""  # why it is not Ready (the Ready condition's reason), for `kubectl get mc`
    message: str = ""
    observed_generation: int | None = None
    ready_models: str = ""
    replicas: int | None = None  # daemon pods of any template (the scale subresource's)
    ready_replicas: int | None = None  # Ready pods of the current template
    replica_status: str = ""  # "ready/desired", for `kubectl get mc`
    selector: str | None = None  # the pods' label selector (the scale subresource's)
    endpoint: str | None = None
    config_hash: str | None = None
    configured_replicas: str = ""
    conditions: tuple[Condition, ...] = ()
    models: tuple[ModelStatus, ...] = ()

    def to_patch(self) -> dict[str, Any]:
        """The status as JSON, without empty values: an empty string means "not set" here,
        and leaving it out keeps stored statuses small and comparable."""
        out: dict[str, Any] = _drop_empty(
            self.model_dump(by_alias=True, exclude_none=True, mode="json")
        )
        return out

    def condition(self, kind: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == kind), None)


def _drop_empty(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_empty(v) for k, v in value.items() if v != ""}
    if isinstance(value, list):
        return [_drop_empty(v) for v in value]
    return value


@dataclass(frozen=True)
class Observation:
    spec: ModelCacheSpec | None
    spec_error: str | None
    error_reason: str
    observed_generation: int | None
    deployment: Mapping[str, Any] | None
    pods: Sequence[PodView]
    answers: Mapping[str, PodAnswer]
    previous: Mapping[str, Any]
    now: str
    endpoint: str | None = None
    config_hash: str | None = None
    selector: str | None = None


@dataclass
class _Verdict:
    phase: str
    reason: str
    message: str
    models_loaded: tuple[str, str, str]  # status, reason, message
    progressing: tuple[str, str, str]
    degraded: tuple[str, str, str]


def _problems(views: Sequence[PodView], skip: set[str]) -> list[tuple[str, str]]:
    """(reason, message) of every pod problem that stops serving, except reasons in skip."""
    return [
        (v.problem.reason, f"pod {v.name}: {v.problem.message}")
        for v in views
        if v.problem is not None and v.problem.reason not in _NON_FATAL | skip
    ]


def _rollout_running(obs: Observation, current: Sequence[PodView], desired: int) -> bool:
    dep = obs.deployment or {}
    status = dep.get("status") or {}
    stale = status.get("observedGeneration", 0) < (dep.get("metadata") or {}).get("generation", 0)
    return stale or len(current) < len(obs.pods) or status.get("updatedReplicas", 0) < desired


def _verdict(
    obs: Observation,
    spec: ModelCacheSpec,
    models: Sequence[ModelStatus],
    current: Sequence[PodView],
    answered: int,
) -> _Verdict:
    desired = spec.replicas
    ready_pods = [v for v in current if v.ready]
    n_ready = sum(m.state == READY for m in models)
    failed = [m for m in models if m.state in (FAILED, DEGRADED)]
    # A failed download is already reported by its model.
    downloads = {"DownloadFailed"} if any(m.error_class == "download" for m in models) else set()
    problems = _problems(current, downloads)
    failure = _replica_failure(obs)
    if failure is not None:  # pods cannot even be created: quota, admission, RuntimeClass
        problems.append(failure)
    rolling = _rollout_running(obs, current, desired)
    stage = least_advanced(list(current)) if len(current) >= desired else PENDING

    if answered == 0:
        loaded = ("Unknown", "NoAnswer", "no current pod answered ListModels yet")
    elif failed:
        loaded = ("False", "ModelFailed", "; ".join(f"{m.name}: {m.error}" for m in failed))
    elif n_ready < len(models):
        loaded = ("False", "ModelsLoading", f"{n_ready}/{len(models)} models ready")
    else:
        loaded = ("True", "AllModelsReady", f"{n_ready}/{len(models)} models ready")

    serving = n_ready > 0 and bool(ready_pods)
    if failed or problems:
        what = [f"model {m.name} {m.state.lower()}: {m.error}" for m in failed]
        what += [text for _, text in problems]
        reason = "ModelFailed" if failed else problems[0][0]
        phase = "Degraded" if serving else "Failed"
        progressing = (
            ("True", "RollingOut", "rollout in progress")
            if rolling
            else ("False", reason, "stopped on a failure; fix it and the rollout resumes")
        )
        return _Verdict(
            phase, reason, "; ".join(what), loaded, progressing, ("True", reason, "; ".join(what))
        )
    if n_ready == len(models) and len(ready_pods) == desired and not rolling:
        msg = f"{n_ready}/{len(models)} models ready on {desired}/{desired} replicas"
        return _Verdict(
            "Ready", "Ready", msg, loaded, ("False", "Complete", msg), ("False", "AsExpected", "")
        )
    if serving and not rolling and n_ready == len(models):
        msg = f"{len(ready_pods)}/{desired} replicas ready"
        return _Verdict(
            "Degraded",
            "ReplicasUnavailable",
            msg,
            loaded,
            ("True", "Scaling", msg),
            ("True", "ReplicasUnavailable", msg),
        )
    reasons = {
        "Pending": "PodsPending",
        "Downloading": "Downloading",
        "Loading": "Loading",
        "Running": "RollingOut",
    }
    notes = [f"pod {v.name}: {v.problem.message}" for v in current if v.problem is not None]
    waiting = next((v.problem.reason for v in current if v.problem is not None), None)
    msg = "; ".join(
        [
            f"{len(ready_pods)}/{desired} replicas ready, {n_ready}/{len(models)} models ready",
            *notes,
        ]
    )
    phase = "Loading" if stage == "Running" else stage
    reason = waiting if waiting and stage == PENDING else reasons[stage]
    return _Verdict(
        phase,
        reason,
        msg,
        loaded,
        ("True", reason, msg),
        ("False", "AsExpected", ""),
    )


def _replica_failure(obs: Observation) -> tuple[str, str] | None:
    """The Deployment's ReplicaFailure condition: its ReplicaSet could not create a pod."""
    for c in (obs.deployment or {}).get("status", {}).get("conditions") or []:
        if c.get("type") == "ReplicaFailure" and c.get("status") == "True":
            return (c.get("reason") or "FailedCreate", c.get("message") or "")
    return None


def _conditions(obs: Observation, verdict: _Verdict) -> tuple[Condition, ...]:
    ready = (
        ("True", "Ready", verdict.message)
        if verdict.phase == "Ready"
        else ("False", verdict.reason, verdict.message)
    )
    values = {
        "Ready": ready,
        "ModelsLoaded": verdict.models_loaded,
        "Progressing": verdict.progressing,
        "Degraded": verdict.degraded,
    }
    old = {c.get("type"): c for c in obs.previous.get("conditions") or []}
    out = []
    for kind in CONDITION_TYPES:
        status, reason, message = values[kind]
        prev = old.get(kind) or {}
        since = prev.get("lastTransitionTime") if prev.get("status") == status else None
        out.append(
            Condition(
                type=kind,
                status=status,
                reason=reason,
                message=message[:1024],
                last_transition_time=since or obs.now,
                observed_generation=obs.observed_generation,
            )
        )
    return tuple(out)


def derive_status(obs: Observation) -> CacheStatus:
    """The whole status for one observation (see the module docstring for the rules)."""
    common: dict[str, Any] = {
        "observed_generation": obs.observed_generation,
        "endpoint": obs.endpoint,
        "config_hash": obs.config_hash,
    }
    if obs.spec is None:
        why = obs.error_reason
        msg = (
            f"the spec cannot be used, fix it and re-apply:\n{obs.spec_error}"
            if why == "InvalidSpec"
            else str(obs.spec_error)
        )
        verdict = _Verdict(
            "Failed", why, msg, ("Unknown", why, msg), ("False", why, msg), ("True", why, msg)
        )
        return CacheStatus(
            phase="Failed",
            reason=why,
            message=msg[:1024],
            conditions=_conditions(obs, verdict),
            models=tuple(ModelStatus.model_validate(m) for m in obs.previous.get("models") or []),
            ready_models=obs.previous.get("readyModels", ""),
            replica_status=obs.previous.get("replicaStatus", ""),
            **common,
        )
    spec = obs.spec
    current = [v for v in obs.pods if v.current]
    answers = {
        v.name: obs.answers[v.name]
        for v in current
        if v.name in obs.answers and obs.answers[v.name].error is None
    }
    previous = {m.get("name"): m for m in obs.previous.get("models") or []}
    models = tuple(
        aggregate.model_status(i, m.name, current, answers, previous.get(m.name))
        for i, m in enumerate(spec.models)
    )
    verdict = _verdict(obs, spec, models, current, len(answers))
    if spec.replicas == 0:
        msg = "spec.replicas is 0: no daemon runs"
        verdict = _Verdict(
            PENDING,
            "ScaledToZero",
            msg,
            ("Unknown", "ScaledToZero", msg),
            ("False", "ScaledToZero", msg),
            ("False", "AsExpected", ""),
        )
    elif obs.deployment is None:
        msg = "creating the Deployment"
        verdict.phase, verdict.reason, verdict.message = PENDING, "Creating", msg
    n_ready = sum(m.state == READY for m in models)
    ready_pods = sum(v.ready for v in current)
    configured = sum(a.config_hash == obs.config_hash for a in answers.values())
    return CacheStatus(
        phase=verdict.phase,
        reason="" if verdict.phase == "Ready" else verdict.reason,
        message="" if verdict.phase == "Ready" else verdict.message[:1024],
        conditions=_conditions(obs, verdict),
        models=models,
        ready_models=f"{n_ready}/{len(models)}",
        replicas=len(obs.pods),
        ready_replicas=ready_pods,
        replica_status=f"{ready_pods}/{spec.replicas}",
        selector=obs.selector,
        configured_replicas=f"{configured}/{len(answers)}" if answers else "",
        **common,
    )
