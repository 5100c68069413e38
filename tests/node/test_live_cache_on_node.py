"""A cache, not a restart, on a real kubelet: model edits reach the running pod through the
ConfigMap volume (the kubelet's symlink swap) without restarting it; a failing model fixed
on the volume comes up by itself; image changes roll the pods with a surge while a client
loop through the ClusterIP sees no failed request, at one replica and at two.
"""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from monitoring.tools import CHART

from modelcache.client import ModelCacheClient, RetryPolicy

from .cluster import DAEMON_IMAGE, OPERATOR_IMAGE, Node, wait_for
from .models import BROKEN, MINILM, TEXTS, TINY_LM

pytestmark = pytest.mark.node

SUFFIX = uuid.uuid4().hex[:6]
RELEASE = "live"
OP_NS = f"live-system-{SUFFIX}"
NS = f"live-apps-{SUFFIX}"
NAME = "live"
OTHER_TAG = "docker.io/library/modelcache:dev-b"  # the same image under a second name
VALUES: dict[str, Any] = {
    "image": {"repository": OPERATOR_IMAGE.split(":")[0], "tag": OPERATOR_IMAGE.split(":")[1]},
    "operator": {"statusInterval": 2, "probeTimeout": 2, "peeringName": f"live-{SUFFIX}"},
}


def models(*names: str) -> list[dict[str, Any]]:
    task = {MINILM: "embedding", TINY_LM: "causal-lm"}
    return [{"name": n, "source": f"/models/{n}", "task": task.get(n, "embedding")} for n in names]


def status(node: Node) -> dict[str, Any]:
    return dict((node.get("modelcache", NAME, "-n", NS) or {}).get("status") or {})


def model_state(node: Node, name: str) -> dict[str, Any]:
    return next((m for m in status(node).get("models") or [] if m["name"] == name), {})


def pods(node: Node) -> list[dict[str, Any]]:
    return node.items("pods", "-n", NS, "-l", f"app.kubernetes.io/instance={NAME}")


def patch(node: Node, spec: dict[str, Any]) -> None:
    node.kubectl("patch", "mc", NAME, "-n", NS, "--type=merge", "-p", json.dumps({"spec": spec}))


def pod_metric(pod: dict[str, Any], name: str, **labels: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://{pod['status']['podIP']}:9400/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    values = [
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(values) if values else None


def daemon(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["status"].get("containerStatuses") or [] if c["name"] == "daemon")


@pytest.fixture(scope="module")
def live(node: Node, node_models: Path) -> Iterator[dict[str, Any]]:
    """The chart, and a Ready one-replica ModelCache serving minilm; its pod."""
    node.kubectl("create", "namespace", OP_NS)
    node.kubectl("create", "namespace", NS)
    node.adopt_kept_crds(RELEASE, OP_NS)
    node.helm("install", RELEASE, str(CHART), "-n", OP_NS, "--wait", values=VALUES)
    node.ctr("images", "tag", f"docker.io/library/{DAEMON_IMAGE}", OTHER_TAG)
    node.apply(
        {
            "apiVersion": "modelcache.io/v1alpha1",
            "kind": "ModelCache",
            "metadata": {"name": NAME, "namespace": NS},
            "spec": {
                "image": DAEMON_IMAGE,
                "models": models(MINILM),
                "resources": {"requests": {"cpu": "50m", "memory": "256Mi"}},
                "storage": {"hostPath": {"path": str(node_models), "type": "Directory"}},
            },
        }
    )
    wait_for("the ModelCache Ready", lambda: status(node).get("phase") == "Ready", 240)
    (pod,) = pods(node)
    yield pod
    node.run("kubectl", "delete", "mc", NAME, "-n", NS, "--timeout=120s", check=False)
    node.run("helm", "uninstall", RELEASE, "-n", OP_NS, "--wait", check=False)
    node.run("ctr", "--address", str(node.state_dir / "containerd" / "containerd.sock"),
             "--namespace", "k8s.io", "images", "rm", OTHER_TAG, check=False)  # fmt: skip
    for ns in (NS, OP_NS):
        node.run("kubectl", "delete", "namespace", ns, "--wait=false", check=False)


def test_models_added_and_removed_live_in_the_same_pod(node: Node, live: dict[str, Any]) -> None:
    uid = live["metadata"]["uid"]
    before = model_state(node, MINILM)
    loads = pod_metric(live, "modelcache_model_loads_total", model=MINILM)
    patch(node, {"models": models(MINILM, TINY_LM)})
    wait_for("tiny-llama Ready", lambda: model_state(node, TINY_LM).get("state") == "Ready", 180)
    (pod,) = pods(node)
    assert pod["metadata"]["uid"] == uid and daemon(pod)["restartCount"] == 0
    assert model_state(node, MINILM)["fingerprint"] == before["fingerprint"]
    assert pod_metric(pod, "modelcache_model_loads_total", model=MINILM) == loads
    st = wait_for(
        "the config on the pod",
        lambda: (s := status(node)).get("configuredReplicas") == "1/1" and s,
    )
    assert st["phase"] == "Ready" and st["readyModels"] == "2/2"
    with ModelCacheClient(f"{pod['status']['podIP']}:50051") as client:
        assert client.logprobs(TINY_LM, TEXTS[:1])[0].logprobs.size > 0

    patch(node, {"models": models(MINILM)})
    wait_for(
        "tiny-llama gone",
        lambda: not model_state(node, TINY_LM) and status(node).get("readyModels") == "1/1",
        180,
    )
    wait_for(
        "its series gone",
        lambda: pod_metric(pod, "modelcache_model_weight_bytes", model=TINY_LM) is None,
        60,
    )
    (pod,) = pods(node)
    assert pod["metadata"]["uid"] == uid and daemon(pod)["restartCount"] == 0


def test_a_failing_model_fixed_on_the_volume_comes_up_without_a_restart(
    node: Node, live: dict[str, Any], node_models: Path
) -> None:
    late = node_models / "late"
    shutil.copytree(node_models / BROKEN, late)
    patch(
        node,
        {
            "models": [
                *models(MINILM),
                {"name": "late", "source": "/models/late", "task": "embedding"},
            ]
        },
    )
    failed = wait_for(
        "late Failed with a retry time",
        lambda: (
            (m := model_state(node, "late")).get("nextRetry") and m.get("state") == "Failed" and m
        ),
        180,
    )
    assert failed["errorClass"] == "corrupt_weights" and failed["loadFailures"] >= 1
    assert status(node)["phase"] in ("Degraded", "Failed")
    shutil.copy(node_models / MINILM / "model.safetensors", late / "model.safetensors")
    wait_for("late Ready", lambda: model_state(node, "late").get("state") == "Ready", 180)
    (pod,) = pods(node)
    assert pod["metadata"]["uid"] == live["metadata"]["uid"] and daemon(pod)["restartCount"] == 0
    patch(node, {"models": models(MINILM)})
    wait_for("back to minilm", lambda: status(node).get("readyModels") == "1/1", 180)


@pytest.mark.parametrize("replicas", [1, 2])
def test_an_image_change_rolls_out_with_no_failed_request(
    node: Node, live: dict[str, Any], replicas: int
) -> None:
    patch(node, {"replicas": replicas})
    wait_for(
        f"{replicas} Ready replicas",
        lambda: (
            status(node).get("replicaStatus") == f"{replicas}/{replicas}"
            and status(node).get("phase") == "Ready"
        ),
        240,
    )
    svc = node.get("service", f"{NAME}-clusterip", "-n", NS)
    assert svc is not None
    address = f"{svc['spec']['clusterIP']}:50051"
    done: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        retry = RetryPolicy(max_attempts=100, initial_backoff=0.05, max_backoff=0.5)
        while not stop.is_set():  # a new channel now and then, as many clients would open
            with ModelCacheClient(address, retry=retry, timeout=60) as client:
                for _ in range(20):
                    if stop.is_set():
                        return
                    try:
                        done.append(client.embed_result(MINILM, TEXTS).fingerprint)
                    except BaseException as exc:  # every failure is a finding
                        errors.append(exc)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for("answers", lambda: len(done) > 10, 60)
    old = {p["metadata"]["uid"] for p in pods(node)}
    image = OTHER_TAG.removeprefix("docker.io/library/") if replicas == 1 else DAEMON_IMAGE
    patch(node, {"image": image})

    def rolled() -> bool:
        now = pods(node)
        fresh = [p for p in now if p["metadata"]["uid"] not in old]
        return (
            len(now) == replicas
            and len(fresh) == replicas
            and all(daemon(p).get("ready") for p in fresh)
            and status(node).get("phase") == "Ready"
        )

    wait_for("the rollout", rolled, 300)
    count = len(done)
    wait_for("answers from the new pods", lambda: len(done) > count + 10, 60)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert len(set(done)) == 1  # the same weights throughout
