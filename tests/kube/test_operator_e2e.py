"""The operator on a real control plane (kube-apiserver + controller-manager 1.20, no kubelet).

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
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tiny_models
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .cluster import REPO_ROOT, KubeEnv
from .operator_cluster import (
    GROUP,
    PLURAL,
    VERSION,
    Account,
    api_client,
    cache,
    create_namespace,
    delete_account,
    delete_caches,
    events,
    install_crds,
    kubectl,
    operator_account,
    play_kubelet,
    pods,
    wait_for,
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

SHA = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
HUB_ID = "acme/tiny-bert"


@pytest.fixture(scope="module")
def admin(kube_env: KubeEnv) -> Iterator[client.ApiClient]:
    api = api_client(kube_env.kubeconfig)
    install_crds(kube_env, api)
    yield api
    api.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def ns(admin: client.ApiClient) -> Iterator[str]:
    name = create_namespace(admin, "mc")
    yield name
    client.CoreV1Api(admin).delete_namespace(name)


@pytest.fixture
def account(
    admin: client.ApiClient, kube_env: KubeEnv, ns: str, tmp_path: Path
) -> Iterator[Account]:
    acc = operator_account(admin, kube_env.kubeconfig, ns, tmp_path)
    yield acc
    delete_account(admin, acc)


@pytest.fixture
def start_operator(
    admin: client.ApiClient, account: Account, ns: str, tmp_path: Path
) -> Iterator[Callable[..., Operator]]:
    """Start operator subprocesses (real kill/restart); every one must never hit a 403."""
    started: list[Operator] = []

    def start(identity: str = "op-a", daemon_port: int = 1, **settings: str) -> Operator:
        op = Operator(
            account.kubeconfig,
            ns,
            tmp_path / f"{identity}.log",
            identity=identity,
            daemon_port=daemon_port,
            **settings,
        )
        started.append(op)
        return op

    yield start
    alive = any(op.proc.poll() is None for op in started)
    delete_caches(admin, ns, timeout=30 if alive else 0)
    for op in started:
        op.stop()
    for op in started:
        op.assert_no_permission_errors()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    good = tiny_models.bert(root / "tiny-bert")
    broken = root / "broken"
    shutil.copytree(good, broken)
    (broken / "model.safetensors").unlink()  # config and tokenizer, no weights
    return {"good": good, "broken": broken}


def modelcache(
    name: str, volume: Path, models: list[dict[str, Any]], **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelCache",
        "metadata": {"name": name},
        "spec": {
            "image": "registry.invalid/modelcache:0.1.0",
            "models": models,
            "storage": {"mountPath": str(volume), "pvc": {"size": "1Gi"}},
            "resources": {"requests": {"cpu": "100m"}},
            **spec,
        },
    }


GOOD = {"name": "good", "source": HUB_ID, "revision": SHA, "task": "embedding"}
BROKEN = {"name": "broken", "source": "broken", "task": "embedding"}


def apply(env: KubeEnv, ns: str, body: dict[str, Any]) -> None:
    kubectl(env, "apply", "-n", ns, "-f", "-", stdin=json.dumps(body))


def status_of(
    admin: client.ApiClient,
    ns: str,
    name: str,
    check: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = 60,
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        body = cache(admin, ns, name) or {}
        status = body.get("status") or {}
        return status if status and check(status) else None

    try:
        return wait_for(what, probe, timeout)
    except AssertionError:
        now = json.dumps((cache(admin, ns, name) or {}).get("status"))
        raise AssertionError(f"{what}; status now: {now}") from None


def children(admin: client.ApiClient, ns: str, name: str) -> dict[str, Any]:
    """The children that exist, by kind (None where missing)."""
    core, apps = client.CoreV1Api(admin), client.AppsV1Api(admin)
    reads = {
        "ConfigMap": lambda: core.read_namespaced_config_map(f"{name}-config", ns),
        "PersistentVolumeClaim": lambda: core.read_namespaced_persistent_volume_claim(
            f"{name}-models", ns
        ),
        "Service": lambda: core.read_namespaced_service(name, ns),
        "Deployment": lambda: apps.read_namespaced_deployment(name, ns),
    }
    out: dict[str, Any] = {}
    for kind, read in reads.items():
        try:
            out[kind] = read()
        except ApiException as exc:
            if exc.status != 404:
                raise
            out[kind] = None
    return out


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
    assert made["spec"]["models"][0]["dtype"] == "float32"
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

    # --- the kubelet: download (for real, offline from the node cache), then serve -----
    play_kubelet(admin, ns, pod.metadata.name, init="running", daemon="waiting")
    status_of(
        admin,
        ns,
        "cache",
        lambda s: s.get("phase") == "Downloading" and s["models"][0]["state"] == "Downloading",
        "phase Downloading",
    )
    [init] = pod.spec.init_containers
    run_init_container(init.command, tmp_path / "init.log")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(kids["ConfigMap"].data["config.yaml"])
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
    finally:
        daemon.stop()
    good, broken = status["models"]
    assert good["loadSeconds"] > 0 and re.fullmatch(r"[0-9a-f]{64}", good["fingerprint"])
    assert good["weightBytes"] > 0 and good["device"] == "cpu" and good["readyReplicas"] == "1/1"
    assert broken["errorClass"] == "not_found"
    assert "no model.safetensors" in broken["error"] and "(pod " in broken["error"]
    assert (status["readyModels"], status["readyReplicas"]) == ("1/2", "1/1")
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
    assert len(by_reason["Created"]) == 4
    assert by_reason["ModelFailed"][0].type == "Warning"
    assert "model good ready in" in by_reason["ModelReady"][0].message
    assert {e.reporting_instance for es in by_reason.values() for e in es} == {"op-a"}

    # --- edit the spec: the Deployment rolls, the new pod serves the new config --------
    dep_before = kids["Deployment"].spec.template.metadata.annotations
    apply(kube_env, ns, modelcache("cache", volume, [GOOD]))
    dep = wait_for(
        "the Deployment to roll",
        lambda: (
            d
            if (
                d := client.AppsV1Api(admin).read_namespaced_deployment("cache", ns)
            ).spec.template.metadata.annotations
            != dep_before
            else None
        ),
    )
    assert (
        dep.spec.template.metadata.annotations["modelcache.io/config-hash"]
        != dep_before["modelcache.io/config-hash"]
    )
    new_pod = wait_for(
        "the new pod",
        lambda: [p for p in pods(admin, ns, "cache") if p.metadata.name != pod.metadata.name],
    )[0]
    new_config = client.CoreV1Api(admin).read_namespaced_config_map("cache-config", ns)
    config_file.write_text(new_config.data["config.yaml"])
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
            lambda s: s.get("phase") == "Ready",
            "phase Ready after the rollout",
            timeout=120,
        )
    finally:
        daemon.stop()
    assert status["readyModels"] == "1/1" and status["observedGeneration"] == 2
    wait_for(
        "the old pod to go",
        lambda: [p.metadata.name for p in pods(admin, ns, "cache")] == [new_pod.metadata.name],
    )
    assert any(
        "rolling out" in e.message for e in _events_by_reason(admin, ns, "cache").get("Updated", [])
    )
    timings["rolled out"] = time.monotonic() - t0

    assert json.loads(http_get(op.liveness_port, "/healthz")) == {"modelcaches": 1}
    metrics = op.metrics()
    ours = "\n".join(line for line in metrics.splitlines() if "modelcache_operator_" in line)
    for pattern in (
        r'reconcile_total\{handler="create",result="success"\} 1\.0',
        r'reconcile_total\{handler="update",result="success"\} [1-9]',
        r'reconcile_total\{handler="timer",result="success"\} [1-9]',
        r'modelcache_operator_modelcaches\{namespace="' + ns + r'",phase="Ready"\} 1\.0',
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
    timings["deleted"] = time.monotonic() - t0
    print("end-to-end timings:", {k: round(v, 1) for k, v in timings.items()})


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
    for listing in (
        core.list_namespaced_config_map,
        core.list_namespaced_service,
        core.list_namespaced_persistent_volume_claim,
        apps.list_namespaced_deployment,
    ):
        assert len(listing(ns, label_selector=labels).items) == 1
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
