"""Processes the operator tests run: the operator itself (``python -m modelcache.operator``,
a real subprocess, so kill and restart are real) and the daemon (``modelcache serve`` on
loopback, standing in for the pod the kubelet would have started), plus the model volume.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .operator_cluster import wait_for

VENV_BIN = Path(sys.executable).parent
_PROXY_VARS = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "grpc_proxy",
    "GRPC_PROXY",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_env(**extra: str) -> dict[str, str]:
    """os.environ without proxies (every connection here is to 127.0.0.1), plus extra."""
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def http_get(port: int, path: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return str(r.read().decode())


class Operator:
    """``python -m modelcache.operator -n NAMESPACE`` with a kubeconfig and settings."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        log: Path,
        *,
        identity: str,
        daemon_port: int,
        **settings: str,
    ) -> None:
        self.metrics_port, self.liveness_port = free_port(), free_port()
        self.identity = identity
        self.log_path = log
        # Set by tests that restart the API server: while it starts up it answers 403 until
        # its RBAC caches are filled, and the operator retries; such retried lines are fine.
        self.tolerate_retried_forbidden = False
        env = local_env(
            KUBECONFIG=str(kubeconfig),
            POD_NAME="",
            MODELCACHE_OPERATOR_IDENTITY=identity,
            MODELCACHE_OPERATOR_STATUS_INTERVAL="1",
            MODELCACHE_OPERATOR_PROBE_TIMEOUT="2",
            MODELCACHE_OPERATOR_DAEMON_ADDRESS_OVERRIDE=f"127.0.0.1:{daemon_port}",
            MODELCACHE_OPERATOR_METRICS_HOST="127.0.0.1",
            MODELCACHE_OPERATOR_METRICS_PORT=str(self.metrics_port),
            MODELCACHE_OPERATOR_LIVENESS_HOST="127.0.0.1",
            MODELCACHE_OPERATOR_LIVENESS_PORT=str(self.liveness_port),
            **{f"MODELCACHE_OPERATOR_{k.upper()}": v for k, v in settings.items()},
        )
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modelcache.operator", "--namespace", namespace],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 60) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None and needle not in self.text():
                raise AssertionError(
                    f"operator exited ({self.proc.returncode}) before "
                    f"logging {needle!r}:\n{self.text()[-3000:]}"
                )
            return needle in self.text()

        wait_for(f"operator log {needle!r}", seen, timeout)

    def wait_active(self, timeout: float = 60) -> None:
        """Peering done and this replica handles resources (it logged that it resumed)."""
        self.wait_log("Resuming operations after the pause", timeout)

    def metrics(self) -> str:
        return http_get(self.metrics_port, "/metrics")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return int(self.proc.returncode)

    def assert_no_permission_errors(self) -> None:
        text = self.text()
        if self.tolerate_retried_forbidden:
            retried = ("will retry", "failed temporarily")
            text = "\n".join(
                line for line in text.splitlines() if not any(r in line for r in retried)
            )
        for needle in ("Forbidden", "forbidden", "Not enough permissions", "API 403"):
            assert needle not in text, f"operator log has {needle!r}:\n{text[-4000:]}"


class Daemon:
    """``modelcache serve`` on loopback with a config the operator rendered."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.port = port
        self.log_path = log
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [
                str(VENV_BIN / "modelcache"),
                "serve",
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--metrics-host",
                "127.0.0.1",
                "--metrics-port",
                str(free_port()),
            ],
            env=local_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def wait_listening(self, timeout: float = 120) -> None:
        def listening() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}"
                )
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for("the daemon's gRPC port", listening, timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def run_init_container(command: list[str], log: Path) -> None:
    """Run an init container's command as the kubelet would, offline, on this machine."""
    assert command[0] == "modelcache", command
    with log.open("ab") as out:
        subprocess.run(
            [str(VENV_BIN / "modelcache"), *command[1:]],
            check=True,
            timeout=300,
            env=local_env(HF_HUB_OFFLINE="1"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def seed_hub_model(
    volume: Path, checkpoint: Path, repo_id: str, revision: str, staging: Path
) -> Path:
    """Put ``checkpoint`` where ``modelcache download REPO --revision SHA`` would, with its
    manifest, as a node-local cache that already holds it (the test runs offline)."""
    staging.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [str(VENV_BIN / "modelcache"), "download", str(checkpoint), "--to", str(staging)],
        check=True,
        timeout=120,
        capture_output=True,
        env=local_env(HF_HUB_OFFLINE="1"),
    )
    dest = volume.joinpath(*repo_id.split("/"), revision)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging / checkpoint.name), dest)
    manifest = dest / ".modelcache-manifest.json"  # as a hub download records it
    recorded = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**recorded, "source": repo_id, "revision": revision}))
    return dest


def elapsed(start: float) -> str:
    return f"{time.monotonic() - start:.1f}s"
