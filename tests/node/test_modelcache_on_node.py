"""What a user's first `helm install` + `kubectl apply` does, on a real kubelet.

The chart installs the operator image built from deploy/docker/operator.Dockerfile; it runs
as a pod with only the chart's RBAC and reaches the API server through the `kubernetes`
Service. A ModelCache then runs the daemon image (deploy/docker/daemon.Dockerfile, CPU
variant) with the bundled all-MiniLM-L6-v2 and a tiny causal LM from a hostPath volume;
its answers through the pod IP and through the Service's ClusterIP must equal in-process
references. Then: Prometheus scraping what the chart's PodMonitors and ServiceMonitors
select, a SIGKILLed daemon container under client load, the failures users meet first
(an image that cannot be pulled, a model that cannot be loaded), and the clean-up.

The tests run in order and share the release and the ModelCache (module fixtures).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from monitoring.tools import CHART, render

from modelcache.client import ModelCacheClient, RetryPolicy

from .cluster import DAEMON_IMAGE, OPERATOR_IMAGE, Node, wait_for
from .models import BROKEN, MINILM, TEXTS, TINY_LM, reference_embeddings, reference_logprobs
from .prometheus import running_prometheus

pytestmark = pytest.mark.node

SUFFIX = uuid.uuid4().hex[:6]
RELEASE = "mc"
OP_NS = f"mc-system-{SUFFIX}"
NS = f"mc-apps-{SUFFIX}"
CACHE = "cache"
VALUES: dict[str, Any] = {
    "image": {"repository": OPERATOR_IMAGE.split(":")[0], "tag": OPERATOR_IMAGE.split(":")[1]},
    "daemon": {
        "image": {"repository": DAEMON_IMAGE.split(":")[0], "tag": DAEMON_IMAGE.split(":")[1]}
    },
    "operator": {"statusInterval": 2, "probeTimeout": 2, "peeringName": f"mc-node-{SUFFIX}"},
}
RETRY = RetryPolicy(max_attempts=200, initial_backoff=0.1, max_backoff=1.0)


def modelcache(
    name: str, models_dir: Path, models: list[dict[str, Any]], image: str = DAEMON_IMAGE
) -> dict[str, Any]:
    return {
        "apiVersion": "modelcache.io/v1alpha1",
        "kind": "ModelCache",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "image": image,
            "models": models,
            "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
            "storage": {"hostPath": {"path": str(models_dir), "type": "Directory"}},
        },
    }


def status(node: Node, name: str) -> dict[str, Any]:
    mc = node.get("modelcache", name, "-n", NS) or {}
    return dict(mc.get("status") or {})


def daemon_pods(node: Node, name: str) -> list[dict[str, Any]]:
    return node.items("pods", "-n", NS, "-l", f"app.kubernetes.io/instance={name}")


def container(pod: dict[str, Any], name: str = "daemon") -> dict[str, Any]:
    statuses = pod["status"].get("containerStatuses") or []
    return next((c for c in statuses if c["name"] == name), {})


def operator_log(node: Node) -> str:
    pods = node.items("pods", "-n", OP_NS, "-l", "app.kubernetes.io/component=operator")
    return "".join(node.logs(OP_NS, p["metadata"]["name"], tail=100000) for p in pods)


@pytest.fixture(scope="module")
def release(node: Node) -> Iterator[str]:
    node.kubectl("create", "namespace", OP_NS)
    node.kubectl("create", "namespace", NS)
    node.adopt_kept_crds(RELEASE, OP_NS)
    node.helm(
        "install", RELEASE, str(CHART), "-n", OP_NS, "--wait", "--timeout", "180s", values=VALUES
    )
    yield RELEASE
    # Normally done by test_delete_and_uninstall_leave_nothing; a safety net otherwise.
    node.run("kubectl", "delete", "modelcaches", "--all", "-n", NS, "--wait=false", check=False)
    node.run("helm", "uninstall", RELEASE, "-n", OP_NS, check=False)
    for ns in (NS, OP_NS):
        node.run("kubectl", "delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="module")
def cache(node: Node, release: str, node_models: Path) -> dict[str, Any]:
    """The Ready ModelCache (minilm + tiny-llama) and its daemon pod."""
    node.apply(
        modelcache(
            CACHE,
            node_models,
            [
                {"name": MINILM, "source": f"/models/{MINILM}", "task": "embedding"},
                {"name": TINY_LM, "source": f"/models/{TINY_LM}", "task": "causal-lm"},
            ],
        )
    )
    wait_for("ModelCache cache Ready", lambda: status(node, CACHE).get("phase") == "Ready", 240)
    (pod,) = daemon_pods(node, CACHE)
    return pod


def test_the_operator_pod_runs_with_only_the_charts_rbac(node: Node, release: str) -> None:
    pods = node.items("pods", "-n", OP_NS, "-l", "app.kubernetes.io/component=operator")
    assert len(pods) == 1, pods
    pod = pods[0]
    assert pod["status"]["phase"] == "Running"
    assert container(pod, "operator")["ready"] is True
    assert container(pod, "operator")["image"].endswith(OPERATOR_IMAGE)
    assert pod["spec"]["serviceAccountName"] == f"{RELEASE}-modelcache-operator"
    log = operator_log(node)
    assert "Activity 'startup' succeeded" in log, log
    assert "Forbidden" not in log, log  # kopf's and the kubernetes client's 403 errors


def test_a_modelcache_serves_the_in_process_numbers_through_pod_and_cluster_ip(
    node: Node, cache: dict[str, Any], node_models: Path
) -> None:
    st = status(node, CACHE)
    assert (st["readyModels"], st["replicaStatus"], st["readyReplicas"]) == ("2/2", "1/1", 1), st
    models = {m["name"]: m for m in st["models"]}
    assert {m["state"] for m in models.values()} == {"Ready"}, models
    assert all(len(m["fingerprint"]) == 64 for m in models.values()), models
    table = node.kubectl("get", "mc", CACHE, "-n", NS)
    assert "Ready" in table and "2/2" in table, table
    # the kubelet runs the probes the operator wrote, and they pass
    assert cache["status"]["phase"] == "Running"
    assert container(cache)["ready"] is True and container(cache)["restartCount"] == 0
    pod_ip = cache["status"]["podIP"]
    svc = node.get("service", f"{CACHE}-clusterip", "-n", NS)
    assert svc is not None
    cluster_ip = svc["spec"]["clusterIP"]
    assert cluster_ip.startswith("10.96."), cluster_ip

    want = reference_embeddings(TEXTS)
    for address in (f"{pod_ip}:50051", f"{cluster_ip}:50051"):
        with ModelCacheClient(address, retry=RETRY, timeout=60) as client:
            got = client.embed(MINILM, TEXTS)
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=address)
            for text in TEXTS:
                (seq,) = client.logprobs(TINY_LM, [text])
                ref = reference_logprobs(node_models / TINY_LM, seq.token_ids)
                assert np.abs(seq.logprobs - ref).max() <= 1e-4, address
            listed = {m.name: m.fingerprint for m in client.list_models().models}
            assert listed == {n: m["fingerprint"] for n, m in models.items()}


def test_prometheus_scrapes_what_the_charts_monitors_select(
    node: Node, cache: dict[str, Any], tmp_path: Path
) -> None:
    docs = render(
        "--set",
        "monitoring.podMonitor.enabled=true",
        "--set",
        "monitoring.serviceMonitor.enabled=true",
        values=VALUES,
        release=RELEASE,
        namespace=OP_NS,
    )
    monitors = [d for d in docs if d["kind"] in ("PodMonitor", "ServiceMonitor")]
    assert len(monitors) == 4, [m["metadata"]["name"] for m in monitors]
    with running_prometheus(node, monitors, tmp_path) as prom:
        for m in monitors:
            kind, name = m["kind"], m["metadata"]["name"]
            job = f"{kind.lower()}/{OP_NS}/{name}"
            up = wait_for(
                f"{job} to scrape a target", lambda j=job: prom.query(f'up{{job="{j}"}} == 1')
            )
            pods = {s["metric"]["pod"] for s in up}
            if "operator" in name:
                assert all(p.startswith(f"{RELEASE}-modelcache-operator-") for p in pods), pods
            else:
                assert pods == {cache["metadata"]["name"]}, pods
        loaded = prom.query('modelcache_model_loaded{modelcache="cache"} == 1')
        assert {s["metric"]["model"] for s in loaded} == {MINILM, TINY_LM}
        # the operator's own series get its pod's namespace; per-ModelCache ones keep theirs
        assert prom.query(f'modelcache_operator_reconcile_total{{namespace="{OP_NS}"}}')
        ready = f'modelcache_operator_modelcache_ready{{namespace="{NS}", name="{CACHE}"}} == 1'
        assert prom.query(ready)


def test_a_killed_daemon_container_is_restarted_and_clients_ride_through(
    node: Node, cache: dict[str, Any]
) -> None:
    pod_ip = cache["status"]["podIP"]
    stop = threading.Event()
    done: list[float] = []
    errors: list[BaseException] = []

    def load() -> None:
        with ModelCacheClient(f"{pod_ip}:50051", retry=RETRY, timeout=120) as client:
            while not stop.is_set():
                try:
                    client.embed(MINILM, TEXTS)
                    done.append(time.monotonic())
                except BaseException as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for("the clients to get answers", lambda: len(done) >= 10, 60)
    container_id = container(cache)["containerID"].removeprefix("containerd://")
    node.ctr("tasks", "kill", "--signal", "SIGKILL", container_id)
    killed = time.monotonic()
    phases: set[str] = set()

    def back() -> bool:
        phase = status(node, CACHE).get("phase", "")
        phases.add(phase)
        (pod,) = daemon_pods(node, CACHE)
        restarted = container(pod).get("restartCount", 0) >= 1 and container(pod)["ready"]
        return restarted and phase == "Ready" and phases != {"Ready"}

    wait_for("the daemon to restart and the ModelCache to be Ready again", back, 180)
    wait_for("answers after the restart", lambda: any(t > killed + 1 for t in done), 60)
    stop.set()
    for t in threads:
        t.join(130)
    assert not errors, errors[:3]
    assert phases - {"Ready"}, f"the status never left Ready: {phases}"
    (pod,) = daemon_pods(node, CACHE)
    assert pod["metadata"]["uid"] == cache["metadata"]["uid"]  # restarted in place


def test_the_first_failures_users_meet_are_explained_in_the_status(
    node: Node, release: str, node_models: Path
) -> None:
    missing = "127.0.0.1:9/modelcache/missing:0.0.1"  # nothing listens there: pull refused
    node.apply(
        modelcache(
            "noimage",
            node_models,
            [{"name": MINILM, "source": f"/models/{MINILM}", "task": "embedding"}],
            image=missing,
        )
    )
    node.apply(
        modelcache(
            "broken",
            node_models,
            [{"name": BROKEN, "source": f"/models/{BROKEN}", "task": "embedding"}],
        )
    )

    def pull_failure() -> dict[str, Any] | None:
        st = status(node, "noimage")
        text = " ".join(c.get("message", "") for c in st.get("conditions", []))
        return st if missing in text and "Image" in text else None

    st = wait_for("the pull failure in the status", pull_failure, 120)
    assert st["phase"] in ("Pending", "Failed", "Loading"), st
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ImagePullFailed", ready

    def load_failure() -> dict[str, Any] | None:
        st = status(node, "broken")
        models = st.get("models") or []
        return st if models and models[0].get("state") == "Failed" else None

    st = wait_for("the loader's error in the status", load_failure, 180)
    (model,) = st["models"]
    assert model["errorClass"] == "corrupt_weights", model
    assert "model.safetensors" in model["error"], model
    assert st["phase"] == "Failed", st
    described = node.kubectl("describe", "mc", "broken", "-n", NS)
    assert "corrupt_weights" in described or model["error"][:40] in described, described


def test_delete_and_uninstall_leave_nothing(node: Node, release: str) -> None:
    node.kubectl("delete", "modelcaches", "--all", "-n", NS, "--timeout=120s")
    wait_for("the daemon pods to go", lambda: not node.items("pods", "-n", NS), 120)
    selector = "app.kubernetes.io/part-of=modelcache"
    for kind in ("deployments", "services", "configmaps"):  # owner references: the GC's job
        wait_for(f"{kind} to go", lambda k=kind: not node.items(k, "-n", NS, "-l", selector), 60)
    # Everything the operator did, with only the chart's RBAC, was allowed.
    log = operator_log(node)
    assert "Forbidden" not in log and "Traceback" not in log, log[-4000:]
    node.helm("uninstall", RELEASE, "-n", OP_NS, "--wait", "--timeout", "120s")
    wait_for("the operator pod to go", lambda: not node.items("pods", "-n", OP_NS), 120)
    for ns in (NS, OP_NS):
        node.kubectl("delete", "namespace", ns, "--wait=false")
    wait_for(
        "both namespaces to be deleted (none stuck Terminating)",
        lambda: node.get("namespace", NS) is None and node.get("namespace", OP_NS) is None,
        180,
    )
