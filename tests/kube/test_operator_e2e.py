"""The operator end to end on a real control plane (kube-apiserver + controller-manager 1.20,
no kubelet), and the CRD schema enforced by the API server.

The operator runs as a subprocess with ONLY the RBAC rules of
deploy/helm/modelcache/files/operator-rbac-rules.yaml (a ServiceAccount token), so a missing
permission fails these tests. The tests play the kubelet by writing pod status, run the init
container's ``modelcache download`` and the daemon (``modelcache serve``) as local processes,
and point the operator at that daemon on 127.0.0.1 through its explicit test setting.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .cluster import REPO_ROOT, KubeEnv
from .operator_cluster import (
    GROUP,
    PLURAL,
    VERSION,
    cache,
    events,
    kubectl,
    play_kubelet,
    pods,
    wait_for,
)
from .operator_fixtures import (  # noqa: F401 - fixtures, used by name
    BROKEN,
    GOOD,
    HUB_ID,
    SHA,
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
from .operator_procs import (
    Daemon,
    Operator,
    free_port,
    http_get,
    run_init_container,
    seed_hub_model,
)

pytestmark = pytest.mark.kube


def test_schema_rejects_bad_specs_server_side(
    admin: client.ApiClient, kube_env: KubeEnv, ns: str, tmp_path: Path
) -> None:
    custom = client.CustomObjectsApi(admin)
    bad = {
        "revision": {**GOOD, "revision": "main"},
        "dtype": {**GOOD, "dtype": "fp8"},
        "hub id without revision": {k: v for k, v in GOOD.items() if k != "revision"},
    }
    for why, model in bad.items():
        with pytest.raises(ApiException) as info:
            custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, modelcache("bad", tmp_path, [model])
            )
        assert info.value.status == 422, why
    for field, value, needle in [
        ("replicas", -1, "spec.replicas"),
        ("image", "registry.invalid/modelcache", "spec.image"),
        ("models", [], "spec.models"),
        ("ports", {"grpc": 70000}, "spec.ports.grpc"),
    ]:
        body = modelcache("bad", tmp_path, [GOOD])
        body["spec"][field] = value
        with pytest.raises(ApiException) as info:
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
        assert info.value.status == 422 and needle in str(info.value.body), field
    # defaults come from the schema
    body = modelcache("defaults", tmp_path, [GOOD])
    del body["spec"]["storage"]
    made: dict[str, Any] = custom.create_namespaced_custom_object(  # type: ignore[assignment]
        GROUP, VERSION, ns, PLURAL, body
    )
    assert made["spec"]["replicas"] == 1 and made["spec"]["ports"]["grpc"] == 50051
    assert made["spec"]["storage"] == {"emptyDir": {}, "mountPath": "/models"}
    assert made["spec"]["models"][0]["dtype"] == "auto"
    assert made["spec"]["batching"]["max_batch_size"] == 64
    example = (REPO_ROOT / "examples" / "modelcache-minilm.yaml").read_text()
    kubectl(kube_env, "apply", "--dry-run=server", "-n", ns, "-f", "-", stdin=example)


def _events_by_reason(admin: client.ApiClient, ns: str, name: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for e in events(admin, ns, name):
        out.setdefault(e.reason, []).append(e)
    return out


def test_end_to_end(
    admin: client.ApiClient,
    kube_env: KubeEnv,
    ns: str,
    start_operator: Callable[..., Operator],
    checkpoints: dict[str, Path],
    tmp_path: Path,
) -> None:
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    volume = tmp_path / "volume"
    seed_hub_model(volume, checkpoints["good"], HUB_ID, SHA, tmp_path / "staging")
    shutil.copytree(checkpoints["broken"], volume / "broken")
    daemon_port = free_port()
    op = start_operator("op-a", daemon_port=daemon_port)
    op.wait_active()
    timings["operator up"] = time.monotonic() - t0

    # --- apply: children appear, each owned by the ModelCache -------------------------
    apply(kube_env, ns, modelcache("cache", volume, [GOOD, BROKEN]))
    uid = (cache(admin, ns, "cache") or {})["metadata"]["uid"]
    kids = wait_for(
        "all four children",
        lambda: k if all((k := children(admin, ns, "cache")).values()) else None,
    )
    for kind, obj in kids.items():
        refs = obj.metadata.owner_references or []
        assert [(r.uid, r.kind, r.controller) for r in refs] == [(uid, "ModelCache", True)], kind
        assert obj.metadata.labels["app.kubernetes.io/instance"] == "cache"
    config = yaml.safe_load(kids["ConfigMap"].data["config.yaml"])
    assert [m["name"] for m in config["models"]] == ["good", "broken"]
    assert config["model_root"] == str(volume)
    pod = wait_for("a daemon pod", lambda: pods(admin, ns, "cache"))[0]
    status_of(admin, ns, "cache", lambda s: s.get("phase") == "Pending", "phase Pending")
    timings["children"] = time.monotonic() - t0

    # --- the kubelet runs the pod: the fetch container finds the hub model already on the
    # volume (a verified cache: nothing is downloaded), the daemon serves ----------------
    _, fetch_c = pod.spec.containers
    assert [c.name for c in pod.spec.containers] == ["daemon", "fetch"]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(kids["ConfigMap"].data["config.yaml"])
    fetch_cmd = [
        config_file.as_posix() if a == "/etc/modelcache/config.yaml" else a for a in fetch_c.command
    ]
    run_init_container([a for a in fetch_cmd if a != "--watch"], tmp_path / "fetch.log")
    daemon = Daemon(config_file, daemon_port, tmp_path / "daemon.log")
    try:
        play_kubelet(admin, ns, pod.metadata.name, init="done", daemon="running")
        daemon.wait_listening()
        play_kubelet(admin, ns, pod.metadata.name, init="done", daemon="ready")
        status = status_of(
            admin,
            ns,
            "cache",
            lambda s: (
                s.get("phase") == "Degraded"
                and [m["state"] for m in s["models"]] == ["Ready", "Failed"]
            ),
            "one model Ready, one Failed, phase Degraded",
            timeout=120,
        )
        timings["degraded"] = time.monotonic() - t0
        assert status["configuredReplicas"] == "1/1"
        assert status["models"][1]["loadFailures"] >= 1 and status["models"][1]["nextRetry"]
        good, broken = status["models"]
        assert good["loadSeconds"] > 0 and re.fullmatch(r"[0-9a-f]{64}", good["fingerprint"])
        assert (
            good["weightBytes"] > 0 and good["device"] == "cpu" and good["readyReplicas"] == "1/1"
        )
        assert broken["errorClass"] == "not_found"
        assert "no model.safetensors" in broken["error"] and "(pod " in broken["error"]
        assert (status["readyModels"], status["replicaStatus"]) == ("1/2", "1/1")
        assert status["endpoint"] == f"dns:///cache.{ns}.svc.cluster.local:50051"
        conds = {c["type"]: c for c in status["conditions"]}
        assert (conds["Ready"]["status"], conds["Ready"]["reason"]) == ("False", "ModelFailed")
        assert conds["Degraded"]["status"] == "True" and "broken" in conds["Degraded"]["message"]
        row = kubectl(kube_env, "get", "mc", "cache", "-n", ns, "--no-headers").stdout.split()
        assert row[1:4] == ["1/2", "1/1", "Degraded"], row

        by_reason = wait_for(
            "the Events",
            lambda: (
                e
                if {"ModelReady", "ModelFailed", "Degraded", "Created"}
                <= set(e := _events_by_reason(admin, ns, "cache"))
                else None
            ),
        )
        assert len(by_reason["Created"]) == 6  # ConfigMap, PVC, two Services, PDB, Deployment
        assert by_reason["ModelFailed"][0].type == "Warning"
        assert "model good ready in" in by_reason["ModelReady"][0].message
        assert {e.reporting_instance for es in by_reason.values() for e in es} == {"op-a"}

        # --- edit the models: the ConfigMap changes, the running daemon follows it; no
        # new pod ---------------------------------------------------------------------
        template_before = kids["Deployment"].spec.template.metadata.annotations
        apply(kube_env, ns, modelcache("cache", volume, [GOOD]))
        new_config = wait_for(
            "the ConfigMap to change",
            lambda: (
                c.data["config.yaml"]
                if (
                    c := client.CoreV1Api(admin).read_namespaced_config_map("cache-config", ns)
                ).data["config.yaml"]
                != kids["ConfigMap"].data["config.yaml"]
                else None
            ),
        )
        config_file.write_text(new_config)  # what the kubelet does to the mounted file
        status = status_of(
            admin,
            ns,
            "cache",
            lambda s: s.get("phase") == "Ready" and s.get("configuredReplicas") == "1/1",
            "phase Ready with the new config, in the same pod",
            timeout=120,
        )
        assert status["readyModels"] == "1/1" and status["observedGeneration"] == 2
        dep = client.AppsV1Api(admin).read_namespaced_deployment("cache", ns)
        assert dep.spec.template.metadata.annotations == template_before
        assert [p.metadata.name for p in pods(admin, ns, "cache")] == [pod.metadata.name]
    finally:
        daemon.stop()
    # --- a pod-level change (resources): the Deployment rolls, the new pod serves -------
    dep_before = client.AppsV1Api(admin).read_namespaced_deployment("cache", ns)
    template_before = dep_before.spec.template.metadata.annotations
    apply(
        kube_env,
        ns,
        modelcache("cache", volume, [GOOD], resources={"requests": {"cpu": "200m"}}),
    )
    wait_for(
        "the Deployment to roll",
        lambda: (
            client.AppsV1Api(admin)
            .read_namespaced_deployment("cache", ns)
            .spec.template.metadata.annotations
            != template_before
        ),
    )
    new_pod = wait_for(
        "the new pod",
        lambda: [p for p in pods(admin, ns, "cache") if p.metadata.name != pod.metadata.name],
    )[0]
    status_of(
        admin,
        ns,
        "cache",
        lambda s: any(
            c["type"] == "Progressing" and c["status"] == "True" for c in s["conditions"]
        ),
        "Progressing during the rollout",
    )
    daemon = Daemon(config_file, daemon_port, tmp_path / "daemon2.log")
    try:
        daemon.wait_listening()
        play_kubelet(admin, ns, new_pod.metadata.name, init="done", daemon="ready")
        status = status_of(
            admin,
            ns,
            "cache",
            lambda s: s.get("phase") == "Ready" and s.get("observedGeneration") == 3,
            "phase Ready after the rollout",
            timeout=120,
        )
    finally:
        daemon.stop()
    assert status["readyModels"] == "1/1"
    wait_for(
        "the old pod to go",
        lambda: [p.metadata.name for p in pods(admin, ns, "cache")] == [new_pod.metadata.name],
    )
    updated = [e.message for e in _events_by_reason(admin, ns, "cache").get("Updated", [])]
    assert any("applied live" in m for m in updated), updated
    assert any("rolling out new pods" in m for m in updated), updated
    timings["rolled out"] = time.monotonic() - t0

    assert json.loads(http_get(op.liveness_port, "/healthz")) == {"modelcaches": 1}
    metrics = op.metrics()
    ours = "\n".join(line for line in metrics.splitlines() if "modelcache_operator_" in line)
    for pattern in (
        r'reconcile_total\{handler="create",result="success"\} 1\.0',
        r'reconcile_total\{handler="update",result="success"\} [1-9]',
        r'reconcile_total\{handler="timer",result="success"\} [1-9]',
        r'modelcache_operator_modelcaches\{namespace="' + ns + r'",phase="Ready"\} 1\.0',
        r'modelcache_operator_modelcache_ready\{name="cache",namespace="' + ns + r'"\} 1\.0',
    ):
        assert re.search(pattern, metrics), f"{pattern} not in:\n{ours}"

    # --- delete: the finalizer is released, children are garbage-collected -----------
    kubectl(kube_env, "delete", "mc", "cache", "-n", ns, "--wait=false")
    wait_for("the ModelCache to go", lambda: cache(admin, ns, "cache") is None)
    wait_for(
        "the children to be garbage-collected",
        lambda: not any(children(admin, ns, "cache").values()),
        timeout=90,
    )
    # ... and stay gone: no status tick outlives the ModelCache (with no finalizer kopf never
    # sees a deletionTimestamp, and a timer left running re-created them every tick).
    quiet_until = time.monotonic() + 5  # five status intervals of the test operator
    while time.monotonic() < quiet_until:
        back = {k: v for k, v in children(admin, ns, "cache").items() if v}
        assert not back, f"children re-created after the delete: {back}"
        time.sleep(0.2)
    # The per-resource readiness series goes with the resource.
    wait_for(
        "the readiness series to go",
        lambda: (
            f'modelcache_operator_modelcache_ready{{name="cache",namespace="{ns}"}}'
            not in op.metrics()
        ),
    )
    timings["deleted"] = time.monotonic() - t0
    print("end-to-end timings:", {k: round(v, 1) for k, v in timings.items()})
