"""The node's network stays inside this machine: pods have no route off it, nothing is
masqueraded, nothing is forwarded between the pod bridge and another interface, and every
listener of the node is on 127.0.0.1 or on the pod bridge's own address."""

from __future__ import annotations

import json
import re
import subprocess
import uuid

import pytest

from .cluster import DAEMON_IMAGE, Node, wait_for

pytestmark = pytest.mark.node

GW = "10.244.0.1"
NODE_PROCESSES = {
    "containerd",
    "kubelet",
    "kube-proxy",
    "kube-scheduler",
    "kube-apiserver",
    "kube-controller-manager",
    "etcd",
}
ROUTES = """
import socket, struct
for line in open("/proc/net/route").read().splitlines()[1:]:
    f = line.split()
    dest = socket.inet_ntoa(struct.pack("<I", int(f[1], 16)))
    mask = socket.inet_ntoa(struct.pack("<I", int(f[7], 16)))
    print(dest, mask)
"""


def test_a_pod_has_routes_to_the_pod_and_service_ranges_only(node: Node) -> None:
    ns = f"net-{uuid.uuid4().hex[:6]}"
    node.kubectl("create", "namespace", ns)
    try:
        wait_for("the default ServiceAccount", lambda: node.get("sa", "default", "-n", ns), 60)
        node.kubectl(
            "run", "routes", "-n", ns, f"--image={DAEMON_IMAGE}", "--restart=Never",
            "--image-pull-policy=IfNotPresent", "--command", "--", "python3", "-c", ROUTES,
        )  # fmt: skip
        wait_for(
            "the pod to finish",
            lambda: (
                (node.get("pod", "routes", "-n", ns) or {}).get("status", {}).get("phase")
                == "Succeeded"
            ),
            120,
        )
        routes = set(node.kubectl("logs", "routes", "-n", ns).split("\n")) - {""}
        assert routes == {"10.244.0.0 255.255.255.0", "10.96.0.0 255.255.0.0"}, routes
    finally:
        node.kubectl("delete", "namespace", ns, "--wait=false")


def test_nothing_is_masqueraded_or_forwarded_off_the_machine() -> None:
    # The CNI bridge plugin turns IP forwarding on; nothing crosses between the bridge and
    # another interface (and `down` restores the setting: checked by the node fixture).
    mangle = subprocess.run(
        ["iptables-save", "-t", "mangle"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    forward = [line for line in mangle if line.startswith("-A FORWARD")]
    assert forward[0] == "-A FORWARD -j MCNODE-FORWARD", forward
    assert [line for line in mangle if line.startswith("-A MCNODE-FORWARD")] == [
        "-A MCNODE-FORWARD -i mcnode0 ! -o mcnode0 -j DROP",
        "-A MCNODE-FORWARD ! -i mcnode0 -o mcnode0 -j DROP",
    ], mangle
    nat = subprocess.run(
        ["iptables-save", "-t", "nat"], capture_output=True, text=True, check=True
    ).stdout
    # kube-proxy's and the kubelet's hairpin rule only: packets a Service sends back to the
    # pod that called it, marked 0x4000, which never leave the bridge. Each MASQUERADE either
    # matches the mark itself or follows a rule of its chain that returns unmarked packets.
    rules = [line for line in nat.splitlines() if line.startswith("-A ")]
    for i, line in enumerate(rules):
        if "MASQUERADE" not in line:
            continue
        chain = line.split()[1]
        guard = f"-A {chain} -m mark ! --mark 0x4000/0x4000 -j RETURN"
        assert "--mark 0x4000/0x4000" in line or guard in rules[:i], line
    out = subprocess.run(["ip", "-j", "route"], capture_output=True, text=True, check=True)
    ours = {(r["dst"], r.get("prefsrc")) for r in json.loads(out.stdout) if r["dev"] == "mcnode0"}
    assert ours == {("10.244.0.0/24", GW), ("10.96.0.0/16", GW)}, ours


def test_every_listener_of_the_node_is_on_loopback_or_the_bridge(node: Node) -> None:
    out = subprocess.run(
        ["ss", "-Hltnp"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    seen = 0
    for line in out:
        names = set(re.findall(r'\(\("([^"]+)"', line))
        if not names & NODE_PROCESSES:
            continue
        seen += 1
        local = line.split()[3]
        host = local.rsplit(":", 1)[0].strip("[]")
        assert host in ("127.0.0.1", GW), line
    assert seen >= 7, out  # etcd x2, apiserver, cm, scheduler, kubelet (x2), proxy (x2) ...
