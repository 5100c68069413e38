"""A second `hack/kube-node.sh up` after a crash works: every daemon of the node SIGKILLed
(containers, shims, mounts and iptables rules left as they were), then `up` cleans the
leftovers, starts everything again, and pods run. (`down` leaving nothing behind is checked
when the node fixture tears down.)"""

from __future__ import annotations

import os
import signal
import uuid

import pytest

from .cluster import DAEMON_IMAGE, Node, node_running, run_script, wait_for

pytestmark = pytest.mark.node

DAEMONS = ("containerd", "kubelet", "kube-proxy", "kube-scheduler")
CONTROL_PLANE = ("kube-controller-manager", "kube-apiserver", "etcd")


def _pid(path: str) -> int | None:
    try:
        return int(open(path).read().strip())
    except (OSError, ValueError):
        return None


def test_up_after_every_daemon_was_killed(node: Node) -> None:
    ns = f"crash-{uuid.uuid4().hex[:6]}"
    node.kubectl("create", "namespace", ns)
    wait_for("the default ServiceAccount", lambda: node.get("sa", "default", "-n", ns), 60)
    node.kubectl(
        "run", "sleeper", "-n", ns, f"--image={DAEMON_IMAGE}", "--image-pull-policy=IfNotPresent",
        "--command", "--", "python3", "-c", "import time; time.sleep(3600)",
    )  # fmt: skip
    wait_for("the pod to run", lambda: _phase(node, ns) == "Running", 120)

    pids = [_pid(f"{node.state_dir}/run/{d}.pid") for d in DAEMONS]
    pids += [_pid(f"{node.state_dir}/cp/{c}.pid") for c in CONTROL_PLANE]
    assert all(pids), pids
    for pid in pids:
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    wait_for("the node to be down", lambda: not node_running(), 30)

    run_script("up", timeout=600)
    assert node_running()
    # The pod that ran before the crash is started again by the new kubelet.
    wait_for("the pod to run again", lambda: _phase(node, ns) == "Running", 180)
    node.kubectl("delete", "namespace", ns, "--wait=false")


def _phase(node: Node, ns: str) -> str:
    pod = node.get("pod", "sleeper", "-n", ns) or {}
    return str(pod.get("status", {}).get("phase", ""))
