"""What a daemon pod's status says about it: which stage it is in and what went wrong.

Pure functions over the Pod JSON the API server returns (the kubelet writes it; in tests,
the test does). The status code builds on these views instead of reading raw pod JSON in
many places, so the kubelet's vocabulary (waiting reasons, termination messages) is
translated into the ModelCache's once, here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelcache.operator.builders import TEMPLATE_HASH
from modelcache.operator.containers import DAEMON, download_model_index

# Stages, least advanced first; a pod's stage is where it is in its life.
PENDING, DOWNLOADING, LOADING, RUNNING = "Pending", "Downloading", "Loading", "Running"
STAGE_ORDER = (PENDING, DOWNLOADING, LOADING, RUNNING)

_FAILING_WAIT_REASONS = {
    "CrashLoopBackOff",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
}


@dataclass(frozen=True)
class Problem:
    reason: str  # CamelCase, used as a condition reason
    message: str


@dataclass(frozen=True)
class PodView:
    name: str
    current: bool  # runs the current pod template (not an older rollout)
    ready: bool  # the Ready condition is True
    stage: str
    pod_ip: str | None
    daemon_running: bool  # the daemon container runs: ListModels can be asked
    downloading: int | None = None  # models[] index being downloaded
    download_failed: tuple[int, str] | None = None  # (models[] index, message)
    problem: Problem | None = None


def _get(d: Mapping[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(d, Mapping):
            return None
        d = d.get(key)
    return d


def _termination_message(status: Mapping[str, Any]) -> str:
    for where in ("state", "lastState"):
        term = _get(status, where, "terminated")
        if term and term.get("exitCode", 0) != 0:
            msg = (term.get("message") or "").strip()
            tail = msg.splitlines()[-1] if msg else ""
            return tail or f"exit code {term.get('exitCode')} ({term.get('reason', 'Error')})"
    return ""


def _failing(status: Mapping[str, Any]) -> str | None:
    """Why a container is failing, or None when it is fine (or merely starting)."""
    waiting = _get(status, "state", "waiting") or {}
    reason = waiting.get("reason", "")
    if reason in _FAILING_WAIT_REASONS:
        detail = _termination_message(status) or waiting.get("message", "")
        return f"{reason}: {detail}" if detail else reason
    term = _get(status, "state", "terminated")
    if term and term.get("exitCode", 0) != 0:
        return _termination_message(status)
    return None


def _condition(pod: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    for c in _get(pod, "status", "conditions") or []:
        if c.get("type") == kind:
            return dict(c)
    return {}


def classify_pod(pod: Mapping[str, Any], template_hash: str) -> PodView:
    name = str(_get(pod, "metadata", "name"))
    annotations = _get(pod, "metadata", "annotations") or {}
    current = annotations.get(TEMPLATE_HASH) == template_hash
    ready = _condition(pod, "Ready").get("status") == "True"
    base: dict[str, Any] = {
        "name": name,
        "current": current,
        "ready": ready,
        "pod_ip": _get(pod, "status", "podIP") or None,
    }

    for status in _get(pod, "status", "initContainerStatuses") or []:
        index = download_model_index(status.get("name", ""))
        if index is None or _get(status, "state", "terminated", "exitCode") == 0:
            continue
        failure = _failing(status)
        if failure is not None:
            return PodView(
                **base,
                stage=DOWNLOADING,
                daemon_running=False,
                download_failed=(index, failure),
                problem=Problem("DownloadFailed", failure),
            )
        if _get(status, "state", "running") is not None:
            return PodView(**base, stage=DOWNLOADING, daemon_running=False, downloading=index)
        break  # waiting to start: the pod is still pending

    for status in _get(pod, "status", "containerStatuses") or []:
        if status.get("name") != DAEMON:
            continue
        failure = _failing(status)
        if failure is not None:
            reason = "ImagePullFailed" if "Image" in failure.split(":")[0] else "DaemonFailing"
            return PodView(
                **base, stage=LOADING, daemon_running=False, problem=Problem(reason, failure)
            )
        if _get(status, "state", "running") is not None:
            stage = RUNNING if ready else LOADING
            return PodView(**base, stage=stage, daemon_running=True)

    scheduled = _condition(pod, "PodScheduled")
    problem = None
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        problem = Problem("Unschedulable", scheduled.get("message", "no node fits the pod"))
    return PodView(**base, stage=PENDING, daemon_running=False, problem=problem)


def least_advanced(views: list[PodView]) -> str:
    if not views:
        return PENDING
    return min((v.stage for v in views), key=STAGE_ORDER.index)
