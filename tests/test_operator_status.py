"""Status from observations, without a cluster: pod stages, the replica-disagreement
policy, phases and conditions, Events on transitions, and the ListModels probe."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from modelcache.operator import builders, probe
from modelcache.operator.aggregate import ModelReport, PodAnswer, from_reports
from modelcache.operator.builders import Owner
from modelcache.operator.events import transitions
from modelcache.operator.pods import classify_pod
from modelcache.operator.spec import parse_spec
from modelcache.operator.status import CacheStatus, Observation, derive_status
from modelcache.v1 import modelcache_pb2, modelcache_pb2_grpc

SHA = "0123456789abcdef0123456789abcdef01234567"
OWNER = Owner(name="cache", namespace="ns1", uid="uid-1")
SPEC = parse_spec(
    "cache",
    {
        "image": "registry.example/modelcache:0.1.0",
        "models": [
            {"name": "good", "source": "org/good", "revision": SHA, "task": "embedding"},
            {"name": "broken", "source": "broken", "task": "embedding"},
        ],
    },
)
CURRENT = builders.template_hash(SPEC, OWNER)
NOW = "2030-01-01T00:00:00Z"


def pod(
    name: str = "cache-1",
    *,
    current: bool = True,
    phase: str = "Pending",
    ready: bool = False,
    init: dict[str, Any] | None = None,
    daemon: dict[str, Any] | None = None,
    ip: str | None = "10.1.2.3",
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": conditions or [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip:
        status["podIP"] = ip
    if init is not None:
        status["initContainerStatuses"] = [{"name": "download-0-good", **init}]
    if daemon is not None:
        status["containerStatuses"] = [{"name": "daemon", "ready": ready, **daemon}]
    return {
        "metadata": {
            "name": name,
            "annotations": {builders.TEMPLATE_HASH: CURRENT if current else "old"},
        },
        "status": status,
    }


RUNNING = {"state": {"running": {"startedAt": NOW}}}
DONE = {"state": {"terminated": {"exitCode": 0}}}


def report(name: str, state: str, **kw: Any) -> ModelReport:
    return ModelReport(name=name, state=state, **kw)


GOOD = report(
    "good",
    "READY",
    fingerprint="f" * 64,
    load_seconds=1.5,
    device="cpu",
    dtype="float32",
    weight_bytes=4096,
    revision=SHA,
)
BROKEN = report(
    "broken",
    "FAILED",
    error="model directory /models/broken does not exist",
    error_class="not_found",
)


def observe(
    pods: list[dict[str, Any]],
    answers: dict[str, PodAnswer] | None = None,
    previous: dict[str, Any] | None = None,
    spec: Any = SPEC,
    deployment: dict[str, Any] | None = None,
    error: str | None = None,
) -> CacheStatus:
    dep = (
        deployment
        if deployment is not None
        else {
            "metadata": {"generation": 1},
            "status": {"observedGeneration": 1, "updatedReplicas": spec.replicas if spec else 1},
        }
    )
    return derive_status(
        Observation(
            spec=spec,
            spec_error=error,
            error_reason="InvalidSpec",
            observed_generation=1,
            deployment=dep,
            pods=[classify_pod(p, CURRENT) for p in pods],
            answers=answers or {},
            previous=previous or {},
            now=NOW,
        )
    )


def conditions(status: CacheStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


# --- pods -------------------------------------------------------------------------------
def test_pod_stages_follow_the_kubelet_vocabulary() -> None:
    unschedulable = pod(
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes",
            }
        ]
    )
    v = classify_pod(unschedulable, CURRENT)
    assert (v.stage, v.problem.reason if v.problem else None) == ("Pending", "Unschedulable")
    v = classify_pod(pod(init=RUNNING), CURRENT)
    assert (v.stage, v.downloading) == ("Downloading", 0)
    crash = {
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {
            "terminated": {"exitCode": 1, "message": "Traceback...\ndownload failed: 404"}
        },
    }
    v = classify_pod(pod(init=crash), CURRENT)
    assert v.download_failed == (0, "CrashLoopBackOff: download failed: 404")
    v = classify_pod(pod(init=DONE, daemon=RUNNING, phase="Running"), CURRENT)
    assert (v.stage, v.daemon_running, v.ready) == ("Loading", True, False)
    v = classify_pod(pod(init=DONE, daemon=RUNNING, phase="Running", ready=True), CURRENT)
    assert (v.stage, v.ready) == ("Running", True)
    pull = {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}
    v = classify_pod(pod(init=DONE, daemon=pull), CURRENT)
    assert v.problem is not None and v.problem.reason == "ImagePullFailed"
    assert not classify_pod(pod(current=False), CURRENT).current


# --- one model across replicas ----------------------------------------------------------
def test_ready_everywhere_with_the_same_weights_is_ready_with_the_slowest_load() -> None:
    slow = report("good", "READY", fingerprint="f" * 64, load_seconds=4.25)
    m = from_reports("good", [("a", GOOD), ("b", slow)], answered=2)
    assert (m.state, m.ready_replicas, m.load_seconds, m.fingerprint) == (
        "Ready",
        "2/2",
        4.25,
        "f" * 64,
    )


def test_replicas_with_different_weights_are_degraded_not_averaged() -> None:
    other = report("good", "READY", fingerprint="e" * 64, load_seconds=1.0)
    m = from_reports("good", [("a", GOOD), ("b", other)], answered=2)
    assert m.state == "Degraded" and m.error_class == "fingerprint_mismatch"
    assert "ffffffff" in (m.error or "") and "on b" in (m.error or "")


def test_ready_on_some_failed_on_others_is_degraded_and_names_the_pods() -> None:
    failed = report("good", "FAILED", error="out of memory", error_class="out_of_memory")
    m = from_reports("good", [("a", GOOD), ("b", failed)], answered=2)
    assert (m.state, m.ready_replicas, m.error_class) == ("Degraded", "1/2", "out_of_memory")
    assert m.error == "failed on 1/2 replicas, ready on 1: out of memory (pod b)"


def test_failed_everywhere_is_failed_with_the_loader_reason() -> None:
    m = from_reports("broken", [("a", BROKEN), ("b", BROKEN)], answered=2)
    assert (m.state, m.error_class) == ("Failed", "not_found")
    assert m.error == "model directory /models/broken does not exist (pod a, b)"
    m = from_reports("broken", [("a", report("broken", "LOADING"))], answered=1)
    assert m.state == "Loading"
    m = from_reports("broken", [], answered=1)  # the pod does not know the model
    assert (m.state, m.ready_replicas) == ("Pending", "0/1")


def test_live_model_set_states_retries_updates_and_downloads() -> None:
    """What a daemon with a live model set reports: a failure with its retry schedule, an
    update failing while the old weights serve, a download in progress."""
    retrying = report(
        "broken", "FAILED", error="gone", error_class="not_found", load_failures=3,
        next_retry_unix=1_900_000_000.0,
    )  # fmt: skip
    later = report("broken", "FAILED", error="gone", error_class="not_found", load_failures=1,
                   next_retry_unix=1_900_000_060.0)  # fmt: skip
    m = from_reports("broken", [("a", retrying), ("b", later)], answered=2)
    assert (m.state, m.load_failures, m.next_retry) == ("Failed", 3, "2030-03-17T17:46:40Z")
    updating = report(
        "good", "READY", fingerprint="f" * 64, pending_update="revision 0123456 -> 89abcde",
        error="no such revision", error_class="not_found", load_failures=2,
        next_retry_unix=1_900_000_000.0,
    )  # fmt: skip
    m = from_reports("good", [("a", updating)], answered=1)
    assert (m.state, m.fingerprint, m.pending_update) == (
        "Ready",
        "f" * 64,
        "revision 0123456 -> 89abcde",
    )
    assert m.error == "update failed, previous weights serve: no such revision (pod a)"
    assert (m.load_failures, m.next_retry) == (2, "2030-03-17T17:46:40Z")
    fetching = report("good", "PENDING", error="being downloaded", error_class="downloading")
    assert from_reports("good", [("a", fetching)], answered=1).state == "Downloading"


def test_configured_replicas_count_the_pods_that_applied_the_current_config() -> None:
    pods = [
        pod(n, daemon=RUNNING, phase="Running", ready=True, ip=f"10.0.0.{i}")
        for i, n in enumerate(("cache-1", "cache-2"))
    ]
    answers = {
        "cache-1": PodAnswer("cache-1", (GOOD, BROKEN), config_hash="new"),
        "cache-2": PodAnswer("cache-2", (GOOD, BROKEN), config_hash="old"),
    }
    status = derive_status(
        Observation(
            spec=SPEC,
            spec_error=None,
            error_reason="",
            observed_generation=1,
            deployment={"metadata": {"generation": 1}, "status": {"observedGeneration": 1}},
            pods=[classify_pod(p, CURRENT) for p in pods],
            answers=answers,
            previous={},
            now=NOW,
            config_hash="new",
        )
    )
    assert status.configured_replicas == "1/2"
    assert status.to_patch()["configuredReplicas"] == "1/2"


# --- the whole status -------------------------------------------------------------------
def test_one_model_ready_one_failed_is_degraded() -> None:
    p = pod(init=DONE, daemon=RUNNING, phase="Running", ready=True)
    status = observe([p], {"cache-1": PodAnswer("cache-1", (GOOD, BROKEN))})
    assert (status.phase, status.ready_models, status.replica_status) == ("Degraded", "1/2", "1/1")
    assert (status.replicas, status.ready_replicas) == (1, 1)
    good, broken = status.models
    assert (good.state, good.load_seconds, good.fingerprint) == ("Ready", 1.5, "f" * 64)
    assert (broken.state, broken.error_class) == ("Failed", "not_found")
    c = conditions(status)
    assert c["Ready"] == ("False", "ModelFailed")
    assert c["ModelsLoaded"] == ("False", "ModelFailed")
    assert c["Degraded"] == ("True", "ModelFailed")
    assert c["Progressing"][0] == "False"


def test_all_ready_is_ready_and_conditions_agree() -> None:
    p = pod(init=DONE, daemon=RUNNING, phase="Running", ready=True)
    fixed = report("broken", "READY", fingerprint="a" * 64, load_seconds=0.5)
    status = observe([p], {"cache-1": PodAnswer("cache-1", (GOOD, fixed))})
    assert (status.phase, status.ready_models) == ("Ready", "2/2")
    assert conditions(status) == {
        "Ready": ("True", "Ready"),
        "ModelsLoaded": ("True", "AllModelsReady"),
        "Progressing": ("False", "Complete"),
        "Degraded": ("False", "AsExpected"),
    }


def test_stages_before_serving() -> None:
    assert observe([]).phase == "Pending"
    assert observe([pod()]).phase == "Pending"
    status = observe([pod(init=RUNNING)])
    assert status.phase == "Downloading"
    assert [m.state for m in status.models] == ["Downloading", "Pending"]
    status = observe([pod(init=DONE, daemon=RUNNING, phase="Running")])
    assert status.phase == "Loading" and conditions(status)["ModelsLoaded"][0] == "Unknown"
    assert observe([pod()], deployment={}).phase == "Pending"


def test_failed_download_without_any_serving_pod_is_failed() -> None:
    crash = {
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 1, "message": "401 gated repo"}},
    }
    status = observe([pod(init=crash)])
    assert status.phase == "Failed"
    assert status.models[0].state == "Failed" and status.models[0].error_class == "download"
    assert "401 gated repo" in (status.condition("Ready").message or "")  # type: ignore[union-attr]


def test_crash_looping_daemon_is_failed_with_its_last_words() -> None:
    crash = {
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 2, "message": "invalid configuration"}},
    }
    status = observe([pod(init=DONE, daemon=crash)])
    assert status.phase == "Failed"
    assert conditions(status)["Degraded"] == ("True", "DaemonFailing")


def test_rollout_in_progress_is_not_ready_and_old_pods_do_not_count() -> None:
    old = pod("old-1", current=False, init=DONE, daemon=RUNNING, phase="Running", ready=True)
    new = pod("new-1", init=RUNNING)
    status = observe([old, new], {"old-1": PodAnswer("old-1", (GOOD, BROKEN))})
    assert status.phase == "Downloading"
    assert conditions(status)["Progressing"] == ("True", "Downloading")
    assert all(m.state != "Failed" for m in status.models)  # the old pod's answer is ignored


def test_missing_replica_after_rollout_is_degraded() -> None:
    fixed = report("broken", "READY", fingerprint="a" * 64)
    spec = parse_spec("cache", {**SPEC.model_dump(by_alias=True, mode="json"), "replicas": 2})
    ok = pod("a", init=DONE, daemon=RUNNING, phase="Running", ready=True)
    status = observe([ok, pod("b")], {"a": PodAnswer("a", (GOOD, fixed))}, spec=spec)
    assert (status.phase, status.replica_status, status.ready_replicas) == ("Degraded", "1/2", 1)
    assert conditions(status)["Degraded"] == ("True", "ReplicasUnavailable")


def test_unreachable_daemon_keeps_the_last_known_models() -> None:
    p = pod(init=DONE, daemon=RUNNING, phase="Running", ready=True)
    first = observe([p], {"cache-1": PodAnswer("cache-1", (GOOD, BROKEN))})
    again = observe(
        [p],
        {"cache-1": PodAnswer("cache-1", error="UNAVAILABLE: refused")},
        previous=first.to_patch(),
    )
    assert again.models == first.models
    assert conditions(again)["ModelsLoaded"] == ("Unknown", "NoAnswer")


def test_invalid_spec_is_failed_and_says_what_to_fix() -> None:
    status = observe([], spec=None, error="spec.models[1].name 'a' repeats models[0].name")
    assert status.phase == "Failed"
    ready = status.condition("Ready")
    assert ready is not None and ready.reason == "InvalidSpec"
    assert "repeats models[0].name" in ready.message and "fix it" in ready.message


def test_scaled_to_zero() -> None:
    spec = parse_spec("cache", {**SPEC.model_dump(by_alias=True, mode="json"), "replicas": 0})
    status = observe([], spec=spec)
    assert (status.phase, status.replica_status, status.ready_replicas) == ("Pending", "0/0", 0)
    assert conditions(status)["Ready"] == ("False", "ScaledToZero")


def test_transition_times_move_only_on_a_change() -> None:
    p = pod(init=DONE, daemon=RUNNING, phase="Running", ready=True)
    answers = {"cache-1": PodAnswer("cache-1", (GOOD, BROKEN))}
    old = observe([p], answers).to_patch()
    for c in old["conditions"]:
        c["lastTransitionTime"] = "2000-01-01T00:00:00Z"
    same = observe([p], answers, previous=old)
    assert {c.last_transition_time for c in same.conditions} == {"2000-01-01T00:00:00Z"}
    assert same.to_patch() == old  # nothing to write
    changed = observe(
        [p],
        {
            "cache-1": PodAnswer(
                "cache-1",
                (GOOD, GOOD.__class__(name="broken", state="READY", fingerprint="b" * 64)),
            )
        },
        previous=old,
    )
    times = {c.type: c.last_transition_time for c in changed.conditions}
    assert times["Ready"] == NOW and times["Degraded"] == NOW


# --- Events -----------------------------------------------------------------------------
def test_events_on_transitions_only() -> None:
    p = pod(init=DONE, daemon=RUNNING, phase="Running", ready=True)
    loading = observe([p]).to_patch()
    degraded = observe([p], {"cache-1": PodAnswer("cache-1", (GOOD, BROKEN))}, previous=loading)
    events = transitions(loading, degraded)
    by_reason = {e.reason: e for e in events}
    assert by_reason["ModelReady"].type == "Normal"
    assert "model good ready in 1.50s on 1/1 replicas" in by_reason["ModelReady"].message
    assert "4.0 KiB" in by_reason["ModelReady"].message
    assert "ffffffffffffffff" in by_reason["ModelReady"].message
    assert by_reason["ModelFailed"].type == "Warning"
    assert "model broken failed (not_found): model directory" in by_reason["ModelFailed"].message
    assert by_reason["Degraded"].type == "Warning"
    assert "phase Loading -> Degraded" in by_reason["Degraded"].message
    assert transitions(degraded.to_patch(), degraded) == []


# --- the probe --------------------------------------------------------------------------
def test_targets_use_pod_ips_unless_overridden() -> None:
    pods = [("a", "10.0.0.1"), ("b", "fd00::1"), ("c", None)]
    assert [t.address for t in probe.targets(pods, 50051, None)] == [
        "10.0.0.1:50051",
        "[fd00::1]:50051",
    ]
    assert [t.address for t in probe.targets(pods, 50051, "127.0.0.1:7000")] == [
        "127.0.0.1:7000"
    ] * 3


class _Daemon(modelcache_pb2_grpc.ModelCacheServicer):
    """Answers ListModels with a fixed list: a test server for the probe's client side."""

    def ListModels(self, request: Any, context: Any) -> modelcache_pb2.ListModelsResponse:
        ok = modelcache_pb2.ModelStatus(
            name="good",
            state=modelcache_pb2.ModelStatus.READY,
            fingerprint="ab" * 32,
            device="cpu",
            dtype="float32",
            weight_bytes=123,
            revision=SHA,
            load_seconds={"read": 0.25, "total": 0.75},
        )
        bad = modelcache_pb2.ModelStatus(
            name="broken",
            state=modelcache_pb2.ModelStatus.FAILED,
            error="no weights",
            error_class="missing_weights",
        )
        return modelcache_pb2.ListModelsResponse(models=[ok, bad])


@pytest.fixture
def local_daemon() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    modelcache_pb2_grpc.add_ModelCacheServicer_to_server(_Daemon(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_list_models_converts_answers_and_reports_unreachable_pods(local_daemon: str) -> None:
    unused = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    dead_port = unused.add_insecure_port("127.0.0.1:0")  # bound, never started: refuses
    answers = probe.list_models(
        [probe.Target("a", local_daemon), probe.Target("b", f"127.0.0.1:{dead_port}")], timeout=2.0
    )
    unused.stop(0)
    good, bad = answers["a"].models
    assert (good.state, good.load_seconds, good.weight_bytes, good.revision) == (
        "READY",
        0.75,
        123,
        SHA,
    )
    assert (bad.state, bad.error_class, bad.load_seconds) == ("FAILED", "missing_weights", None)
    assert answers["b"].error is not None and answers["b"].error.startswith(
        ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    )


def test_stuck_pods_are_explained_in_reason_and_message() -> None:
    unschedulable = pod(
        ip=None,
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            }
        ],
    )
    status = observe([unschedulable])
    assert (status.phase, status.reason) == ("Pending", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in status.message
    assert status.to_patch()["reason"] == "Unschedulable"
    # pods cannot be created at all: the Deployment's ReplicaFailure condition
    refused = {
        "metadata": {"generation": 1},
        "status": {
            "observedGeneration": 1,
            "conditions": [
                {
                    "type": "ReplicaFailure",
                    "status": "True",
                    "reason": "FailedCreate",
                    "message": 'pods "cache-x" is forbidden: pod rejected: RuntimeClass '
                    '"gvisor" not found',
                }
            ],
        },
    }
    status = observe([], deployment=refused)
    assert (status.phase, status.reason) == ("Failed", "FailedCreate")
    assert 'RuntimeClass "gvisor" not found' in status.message
    # Ready: no reason, the scale subresource's fields set
    p = pod(daemon=RUNNING, phase="Running", ready=True)
    fixed = report("broken", "READY", fingerprint="a" * 64)
    status = observe([p], {"cache-1": PodAnswer("cache-1", (GOOD, fixed))})
    assert (status.phase, status.reason, status.message) == ("Ready", "", "")
    assert (status.replicas, status.ready_replicas, status.replica_status) == (1, 1, "1/1")
