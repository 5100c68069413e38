"""Start (building on first use) the local Kubernetes control plane of hack/kube-control-plane.sh.

etcd + kube-apiserver + kube-controller-manager on 127.0.0.1, no kubelet and no scheduler:
Deployments get ReplicaSets and Pods, garbage collection works, Pods never run.
The first call builds kube-apiserver/kube-controller-manager from Debian's source (about 6
minutes on 2 cores); later calls reuse the cached binaries and a running control plane.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Logs of the processes a test started (operators): conftest attaches their tails to the
# report of a test that fails, so a CI log that shows only the failure still says why.
PROCESS_LOGS = pytest.StashKey[list[Path]]()
REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "hack" / "kube-control-plane.sh"


@dataclass(frozen=True)
class KubeEnv:
    kubeconfig: Path
    bin_dir: Path
    state_dir: Path

    @property
    def kubectl(self) -> Path:
        return self.bin_dir / "kubectl"

    @property
    def helm(self) -> Path:
        return self.bin_dir / "helm"

    def environ(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG and PATH for running kubectl/helm in a subprocess."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "modelcache-kube"
    return Path(os.environ.get("MODELCACHE_KUBE_CACHE", default))


def state_dir() -> Path:
    """The script's state dir (per checkout unless MODELCACHE_KUBE_STATE says otherwise)."""
    out = subprocess.run(
        ["bash", str(SCRIPT), "env"],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for line in out.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        if key == "MODELCACHE_KUBE_STATE":
            return Path(value)
    raise RuntimeError(f"'{SCRIPT} env' printed no MODELCACHE_KUBE_STATE: {out!r}")


def run_script(*args: str, timeout: float = 1800) -> None:
    """Run hack/kube-control-plane.sh; its progress goes to our stderr."""
    subprocess.run(
        ["bash", str(SCRIPT), *args],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=sys.stderr,
        timeout=timeout,
    )


def control_plane_running() -> bool:
    """True when etcd, kube-apiserver and kube-controller-manager run and /readyz is ok."""
    result = subprocess.run(
        ["bash", str(SCRIPT), "status"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        timeout=60,
    )
    return result.returncode == 0


def ensure_control_plane() -> KubeEnv:
    """Build (if not cached) and start (if not running) the control plane; return its paths."""
    run_script("build")
    try:
        run_script("start", timeout=300)
    except subprocess.SubprocessError:
        # One clean retry: a start-up that lost a race (a port taken between being picked
        # and bound, an apiserver slow to settle) should not fail the whole kube suite.
        print("control plane start failed; stopping and starting once more", file=sys.stderr)
        run_script("stop", timeout=120)
        run_script("start", timeout=300)
    env = KubeEnv(
        kubeconfig=state_dir() / "admin.kubeconfig",
        bin_dir=cache_dir() / "bin",
        state_dir=state_dir(),
    )
    if not env.kubeconfig.is_file():
        raise RuntimeError(f"{env.kubeconfig} missing after 'start'")
    return env


def stop_control_plane() -> None:
    run_script("stop", timeout=120)
