"""The local one-node cluster of hack/kube-node.sh, from the tests' side: bring it up (building
on first use), run kubectl and helm against it, wait for what the kubelet does.

Unlike tests/kube (an API server whose pods never run), pods here really run: containerd
starts them from the images `hack/kube-node.sh images` built from deploy/docker/, on a bridge
that exists only inside this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "hack" / "kube-node.sh"
DAEMON_IMAGE = "modelcache:dev"
OPERATOR_IMAGE = "modelcache-operator:dev"
T = TypeVar("T")


def run_script(*args: str, timeout: float = 1800) -> None:
    """hack/kube-node.sh VERB; its progress goes to our stderr."""
    subprocess.run(
        ["bash", str(SCRIPT), *args],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=sys.stderr,
        timeout=timeout,
    )


def script_env() -> dict[str, str]:
    """The exports of `hack/kube-node.sh env`."""
    out = subprocess.run(
        ["bash", str(SCRIPT), "env"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    env = {}
    for line in out.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


def node_running() -> bool:
    proc = subprocess.run(
        ["bash", str(SCRIPT), "status"], capture_output=True, timeout=60, check=False
    )
    return proc.returncode == 0


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 120) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


#: The CRDs the chart installs (and keeps after `helm uninstall`).
CHART_CRDS = ("modelcaches.modelcache.io", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev")


@dataclass(frozen=True)
class Node:
    kubeconfig: Path
    bin_dir: Path
    state_dir: Path

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            env.pop(proxy, None)
        return env

    def run(
        self,
        tool: str,
        *args: str,
        stdin: str | None = None,
        check: bool = True,
        timeout: float = 180,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.bin_dir / tool) if tool in ("kubectl", "helm") else tool, *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.environ(),
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)}: {proc.stderr}{proc.stdout}")
        return proc

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        return self.run("kubectl", *args, stdin=stdin, check=check).stdout

    def apply(self, manifest: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", stdin=json.dumps(manifest))

    def get(self, *args: str) -> dict[str, Any] | None:
        proc = self.run("kubectl", "get", *args, "-o", "json", check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr or "not found" in proc.stderr:
                return None
            raise AssertionError(proc.stderr)
        data: dict[str, Any] = json.loads(proc.stdout)
        return data

    def items(self, *args: str) -> list[dict[str, Any]]:
        data = self.get(*args)
        return list((data or {}).get("items") or [])

    def helm(self, *args: str, values: dict[str, Any] | None = None, timeout: float = 300) -> str:
        extra = ["--values", "-"] if values is not None else []
        stdin = yaml.safe_dump(values) if values is not None else None
        return self.run("helm", *args, *extra, stdin=stdin, timeout=timeout).stdout

    def adopt_kept_crds(self, release: str, namespace: str) -> None:
        """`helm uninstall` keeps the chart's CRDs (crds.keep): a release installed earlier on
        this node left them. Let ``release`` adopt them, as `helm install` refuses objects it
        does not own."""
        for crd in CHART_CRDS:
            if self.get("crd", crd) is not None:
                managed = "app.kubernetes.io/managed-by=Helm"
                self.kubectl("label", "crd", crd, "--overwrite", managed)
                self.kubectl(
                    "annotate", "crd", crd, "--overwrite",
                    f"meta.helm.sh/release-name={release}",
                    f"meta.helm.sh/release-namespace={namespace}",
                )  # fmt: skip

    def ctr(self, *args: str) -> str:
        sock = self.state_dir / "containerd" / "containerd.sock"
        return self.run("ctr", "--address", str(sock), "--namespace", "k8s.io", *args).stdout

    def logs(self, namespace: str, pod: str, container: str | None = None, tail: int = 80) -> str:
        args = ["logs", "-n", namespace, pod, f"--tail={tail}"]
        if container:
            args += ["-c", container]
        return self.run("kubectl", *args, check=False).stdout


def ensure_node() -> Node:
    """Build what is missing, start the node and import the images (each a no-op if done)."""
    run_script("build")
    run_script("up", timeout=600)
    run_script("images", timeout=1800)
    env = script_env()
    return Node(
        kubeconfig=Path(env["KUBECONFIG"]),
        bin_dir=Path(env["PATH"].split(":", 1)[0]),
        state_dir=Path(env["MODELCACHE_NODE_STATE"]),
    )
