"""What a node can leave behind on the machine: checked after `hack/kube-node.sh down`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

BRIDGE = "mcnode0"
NODE_BINARIES = {
    "containerd",
    "containerd-shim-runc-v2",
    "kubelet",
    "kube-proxy",
    "kube-scheduler",
    "kube-apiserver",
    "kube-controller-manager",
    "etcd",
}


def _node_processes(state_dir: Path) -> list[str]:
    """Our daemons (and container shims) still alive: those whose command line names the state
    dir, plus any shim (this machine runs no other containerd)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            exe = os.path.basename(os.readlink(f"/proc/{pid}/exe")).removesuffix(" (deleted)")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if exe in NODE_BINARIES and (str(state_dir) in cmdline or exe.startswith("containerd-")):
            found.append(f"{exe}[{pid}]")
    return found


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60).stdout


def leftovers(state_dir: Path) -> list[str]:
    left = _node_processes(state_dir)
    left += [
        f"mount {line}"
        for line in _run("findmnt", "-rn", "-o", "TARGET").splitlines()
        if line.startswith(str(state_dir))
    ]
    links = _run("ip", "-o", "link", "show")
    left += [f"link {BRIDGE}" for line in links.splitlines() if f": {BRIDGE}:" in line]
    left += [f"veth {line.split(':')[1].strip()}" for line in links.splitlines() if "veth" in line]
    left += [f"netns {n}" for n in _run("ip", "netns", "list").split()]
    for table in ("filter", "nat", "mangle"):
        rules = _run("iptables-save", "-t", table)
        left += [
            f"iptables -t {table} {line}"
            for line in rules.splitlines()
            if "KUBE-" in line or "CNI-" in line or "MCNODE-" in line
        ]
    left += [f"cgroup {d}" for d in Path("/sys/fs/cgroup").glob("*/kubepods")]
    if state_dir.exists():
        left.append(f"state dir {state_dir}")
    return left
