"""The operator on a real control plane when things go wrong: specs that pass the schema but
not the operator, a crash between two child writes, two replicas (one active, the other
taking over after a crash), objects it must not touch, and a permission it lacks.

Like test_operator_e2e.py, every operator runs as a subprocess with only the RBAC rules of
deploy/helm/modelcache/files/operator-rbac-rules.yaml.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from .cluster import KubeEnv
from .operator_cluster import (
    cache,
    delete_account,
    delete_caches,
    events,
    operator_account,
    wait_for,
)
from .operator_fixtures import (  # noqa: F401 - fixtures, used by name
    BROKEN,
    apply,
    children,
    fixture_account,
    fixture_admin,
    fixture_checkpoints,
    fixture_ns,
    fixture_start_operator,
    modelcache,
    status_of,
)
from .operator_procs import Operator

pytestmark = pytest.mark.kube


def test_invalid_spec_fails_with_a_message_and_no_children(
    admin: client.ApiClient,
    kube_env: KubeEnv,
    ns: str,
    start_operator: Callable[..., Operator],
    tmp_path: Path,
) -> None:
    op = start_operator("op-a")
    op.wait_active()
    twice = [BROKEN, {**BROKEN, "source": "other"}]  # passes the schema, not the operator
    apply(kube_env, ns, modelcache("dup", tmp_path, twice))
    status = status_of(admin, ns, "dup", lambda s: s.get("phase") == "Failed", "phase Failed")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidSpec"
    assert "spec.models[1].name 'broken' repeats models[0].name" in ready["message"]
    warning = wait_for(
        "a Warning Event", lambda: [e for e in events(admin, ns, "dup") if e.type == "Warning"]
    )
    assert "repeats models[0].name" in warning[0].message
    time.sleep(3)  # several status refreshes later: still nothing built, no crash loop
    assert not any(children(admin, ns, "dup").values())
    assert op.proc.poll() is None
    assert "Traceback" not in op.text()
    # fixing the spec recovers: children appear and the phase moves on
    apply(kube_env, ns, modelcache("dup", tmp_path, [BROKEN]))
    wait_for("the children", lambda: all(children(admin, ns, "dup").values()))
    status_of(
        admin,
        ns,
        "dup",
        lambda s: s.get("phase") == "Pending" and s.get("observedGeneration") == 2,
        "phase Pending for generation 2",
    )


def _fingerprint(obj: Any) -> tuple[Any, ...]:
    """What the operator writes on a child (resourceVersion moves for controller writes)."""
    meta = obj.metadata
    return (
        meta.uid,
        meta.generation,
        meta.annotations,
        meta.labels,
        client.ApiClient().sanitize_for_serialization(obj.spec)
        if hasattr(obj, "spec") and obj.spec is not None
        else obj.data,
    )


def test_operator_restart_mid_reconcile_duplicates_nothing(
    admin: client.ApiClient,
    kube_env: KubeEnv,
    ns: str,
    start_operator: Callable[..., Operator],
    tmp_path: Path,
) -> None:
    # A crashed replica is presumed alive until its peering keep-alive expires: keep it short.
    crashing = start_operator("op-crash", fault_exit_after="Service", peering_lifetime="5")
    crashing.wait_active()
    apply(kube_env, ns, modelcache("cache", tmp_path, [BROKEN]))
    wait_for("the operator to crash after the Service", lambda: crashing.proc.poll() == 17)
    before = children(admin, ns, "cache")
    assert before["Deployment"] is None  # the crash came between two children
    assert all(before[k] is not None for k in ("ConfigMap", "PersistentVolumeClaim", "Service"))

    second = start_operator("op-b")
    second.wait_active()
    after = wait_for(
        "the Deployment", lambda: c if (c := children(admin, ns, "cache"))["Deployment"] else None
    )
    for kind in ("ConfigMap", "Service"):
        assert after[kind].metadata.resource_version == before[kind].metadata.resource_version
    status_of(
        admin,
        ns,
        "cache",
        lambda s: s.get("observedGeneration") == 1 and s.get("phase") == "Pending",
        "status after the restart",
    )
    apps = client.AppsV1Api(admin)
    wait_for("one ReplicaSet", lambda: len(apps.list_namespaced_replica_set(ns).items) == 1)
    core = client.CoreV1Api(admin)
    labels = "app.kubernetes.io/instance=cache"
    for listing, count in (
        (core.list_namespaced_config_map, 1),
        (core.list_namespaced_service, 2),  # headless + NAME-clusterip
        (core.list_namespaced_persistent_volume_claim, 1),
        (apps.list_namespaced_deployment, 1),
    ):
        assert len(listing(ns, label_selector=labels).items) == count
    # the Deployment controller annotates the Deployment once: let it, then take a snapshot
    wait_for(
        "the Deployment's revision annotation",
        lambda: (
            "deployment.kubernetes.io/revision"
            in (apps.read_namespaced_deployment("cache", ns).metadata.annotations or {})
        ),
    )
    after = children(admin, ns, "cache")
    settled = {k: _fingerprint(v) for k, v in after.items()}

    assert second.stop() == 0  # graceful: SIGTERM
    third = start_operator("op-c")
    third.wait_log("Handler 'resumed' succeeded")
    third.wait_log("Timer 'refresh' succeeded")
    time.sleep(2)
    again = children(admin, ns, "cache")
    for kind, obj in again.items():
        assert _fingerprint(obj) == settled[kind], kind
    for kind in ("ConfigMap", "Service"):
        assert again[kind].metadata.resource_version == after[kind].metadata.resource_version
    assert len(apps.list_namespaced_replica_set(ns).items) == 1
    assert (cache(admin, ns, "cache") or {})["metadata"]["generation"] == 1

    # a child deleted by hand comes back on the next status refresh
    client.CoreV1Api(admin).delete_namespaced_service("cache", ns, _preload_content=False)
    wait_for("the Service to be recreated", lambda: children(admin, ns, "cache")["Service"])


def test_a_foreign_object_is_never_overwritten(
    admin: client.ApiClient,
    kube_env: KubeEnv,
    ns: str,
    start_operator: Callable[..., Operator],
    tmp_path: Path,
) -> None:
    core = client.CoreV1Api(admin)
    core.create_namespaced_config_map(
        ns, {"metadata": {"name": "cache-config"}, "data": {"mine": "keep"}}
    )
    op = start_operator("op-a")
    op.wait_active()
    apply(kube_env, ns, modelcache("cache", tmp_path, [BROKEN]))
    status = status_of(admin, ns, "cache", lambda s: s.get("phase") == "Failed", "Failed")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ChildConflict"
    assert "ConfigMap cache-config already exists and is not owned" in ready["message"]
    assert core.read_namespaced_config_map("cache-config", ns).data == {"mine": "keep"}
    kids = children(admin, ns, "cache")
    assert [k for k, v in kids.items() if v is not None] == ["ConfigMap"]  # nothing else


def test_two_operator_replicas_one_active(
    admin: client.ApiClient,
    kube_env: KubeEnv,
    ns: str,
    start_operator: Callable[..., Operator],
    tmp_path: Path,
) -> None:
    first = start_operator("op-a", peering_lifetime="6")
    first.wait_active()
    second = start_operator("op-b", peering_lifetime="6")
    second.wait_log("Activity 'startup' succeeded")  # and then it stays paused:
    apply(kube_env, ns, modelcache("cache", tmp_path, [BROKEN]))
    wait_for("the children", lambda: all(children(admin, ns, "cache").values()))
    status_of(admin, ns, "cache", lambda s: s.get("phase") == "Pending", "status")
    time.sleep(2)
    assert {e.reporting_instance for e in events(admin, ns, "cache")} == {"op-a"}
    assert "Handler 'created'" in first.text()
    assert "Resuming operations" not in second.text()
    assert "Handler" not in second.text() and "Timer" not in second.text()

    first.stop(signal.SIGKILL)  # a crash: no goodbye in the peering object
    second.wait_active(timeout=30)
    body = modelcache("cache", tmp_path, [BROKEN], replicas=2)
    apply(kube_env, ns, body)
    wait_for(
        "the second replica to scale the Deployment",
        lambda: client.AppsV1Api(admin).read_namespaced_deployment("cache", ns).spec.replicas == 2,
    )
    wait_for(
        "an Event from op-b",
        lambda: any(e.reporting_instance == "op-b" for e in events(admin, ns, "cache")),
    )


def test_a_missing_permission_is_caught(
    admin: client.ApiClient, kube_env: KubeEnv, ns: str, tmp_path: Path
) -> None:
    """The RBAC rules are enforced for real: without `list pods` the reconcile fails."""
    account = operator_account(admin, kube_env.kubeconfig, ns, tmp_path, drop=("pods", "list"))
    op = Operator(account.kubeconfig, ns, tmp_path / "op.log", identity="op-x", daemon_port=1)
    try:
        op.wait_active()
        apply(kube_env, ns, modelcache("cache", tmp_path, [BROKEN]))
        op.wait_log("Kubernetes API 403 Forbidden")
        wait_for(
            "a retry counted",
            lambda: re.search(
                r'reconcile_total\{handler="create",result="retry"\} [1-9]', op.metrics()
            ),
        )
        assert "forbidden" in op.text()
        assert "status" not in (cache(admin, ns, "cache") or {})
    finally:
        delete_caches(admin, ns)
        op.stop()
        delete_account(admin, account)
