"""Fitting the cluster, on a real kubelet: `kubectl scale` through the scale subresource, the
PodDisruptionBudget, the reasons stuck pods give (no GPU on the node, an unknown
RuntimeClass) in `kubectl get mc`, and a ModelCache that is deleted after the operator is
gone (no finalizer holds it)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from monitoring.tools import CHART

from .cluster import DAEMON_IMAGE, OPERATOR_IMAGE, Node, wait_for
from .models import MINILM

pytestmark = pytest.mark.node

SUFFIX = uuid.uuid4().hex[:6]
RELEASE = "fit"
OP_NS = f"fit-system-{SUFFIX}"
NS = f"fit-apps-{SUFFIX}"
VALUES: dict[str, Any] = {
    "image": {"repository": OPERATOR_IMAGE.split(":")[0], "tag": OPERATOR_IMAGE.split(":")[1]},
    # ModelCaches here leave spec.image out: the chart's daemon image is their default
    "daemon": {"image": {"repository": "modelcache", "tag": DAEMON_IMAGE.split(":")[1]}},
    "operator": {"statusInterval": 2, "probeTimeout": 2, "peeringName": f"fit-{SUFFIX}"},
}


def cache(name: str, models_dir: Path, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "modelcache.io/v1alpha1",
        "kind": "ModelCache",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "models": [{"name": MINILM, "source": f"/models/{MINILM}", "task": "embedding"}],
            "resources": {"requests": {"cpu": "50m", "memory": "256Mi"}},
            "storage": {"hostPath": {"path": str(models_dir), "type": "Directory"}},
            **spec,
        },
    }


def status(node: Node, name: str) -> dict[str, Any]:
    return dict((node.get("modelcache", name, "-n", NS) or {}).get("status") or {})


def row(node: Node, name: str) -> dict[str, str]:
    """`kubectl get mc NAME` as the user sees it, by column."""
    header, line = node.kubectl("get", "mc", name, "-n", NS).splitlines()[:2]
    starts = [header.index(h) for h in header.split()]
    cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    return dict(zip(header.split(), cells, strict=True))


@pytest.fixture(scope="module")
def release(node: Node) -> Iterator[str]:
    node.kubectl("create", "namespace", OP_NS)
    node.kubectl("create", "namespace", NS)
    node.adopt_kept_crds(RELEASE, OP_NS)
    node.helm("install", RELEASE, str(CHART), "-n", OP_NS, "--wait", values=VALUES)
    yield RELEASE
    node.run("helm", "uninstall", RELEASE, "-n", OP_NS, check=False)
    node.run("kubectl", "delete", "mc", "--all", "-n", NS, "--wait=false", check=False)
    for ns in (NS, OP_NS):
        node.run("kubectl", "delete", "namespace", ns, "--wait=false", check=False)


def test_kubectl_scale_and_the_disruption_budget(
    node: Node, release: str, node_models: Path
) -> None:
    node.apply(cache("fit", node_models))
    wait_for("fit Ready", lambda: status(node, "fit").get("phase") == "Ready", 240)
    node.kubectl("scale", "mc", "fit", "-n", NS, "--replicas=2")

    def scaled() -> bool:
        st = status(node, "fit")
        return (st.get("readyReplicas"), st.get("replicas"), st.get("phase")) == (2, 2, "Ready")

    wait_for("two Ready replicas counted in the status", scaled, 240)
    st = status(node, "fit")
    assert st["replicaStatus"] == "2/2" and st["selector"].startswith("app.kubernetes.io/")
    assert row(node, "fit")["REPLICAS"] == "2/2"
    pods = node.items("pods", "-n", NS, "-l", st["selector"])
    assert len(pods) == 2 and all(p["status"]["phase"] == "Running" for p in pods)
    pdb = node.get("pdb", "fit", "-n", NS)
    assert pdb is not None and pdb["spec"]["maxUnavailable"] == 1
    assert pdb["status"]["expectedPods"] == 2


def test_stuck_pods_say_why_in_kubectl_get(node: Node, release: str, node_models: Path) -> None:
    node.apply(cache("gpu", node_models, resources={"limits": {"nvidia.com/gpu": 1}}))
    node.apply(cache("rtc", node_models, runtimeClassName="no-such-runtime"))
    gpu = wait_for(
        "the GPU request explained",
        lambda: (r := row(node, "gpu")).get("REASON") == "Unschedulable" and r,
        120,
    )
    assert gpu["PHASE"] == "Pending"
    assert "nvidia.com/gpu" in status(node, "gpu")["message"]
    rtc = wait_for(
        "the RuntimeClass explained",
        lambda: (r := row(node, "rtc")).get("REASON", "") not in ("", "PodsPending") and r,
        120,
    )
    assert rtc["REASON"] in ("FailedCreate", "FailedCreatePodSandBox"), rtc
    assert "no-such-runtime" in status(node, "rtc")["message"]


def test_a_modelcache_is_deleted_after_the_operator_is_gone(node: Node, release: str) -> None:
    node.helm("uninstall", RELEASE, "-n", OP_NS, "--wait", "--timeout", "120s")
    wait_for("the operator to go", lambda: not node.items("pods", "-n", OP_NS), 120)
    for name in ("fit", "gpu", "rtc"):
        mc = node.get("modelcache", name, "-n", NS)
        assert mc is not None and not mc["metadata"].get("finalizers"), mc["metadata"]
    node.kubectl("delete", "mc", "--all", "-n", NS, "--timeout=60s")
    wait_for("the daemon pods to go", lambda: not node.items("pods", "-n", NS), 120)
