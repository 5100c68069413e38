"""``modelcache serve`` as a real child process on loopback, for tests and benchmarks that
need what an in-process server cannot give: a crash that is visible as a dead process (not
a dead test runner), SIGKILL, restarts on the same port, the process's own RSS and thread
count, and a server that does not share the client's GIL.

The port is whatever the daemon bound (``--port 0``, read from its log), unless a fixed
one is asked for (a restart on the same address). Only 127.0.0.1 is ever used.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import yaml

from modelcache.v1 import modelcache_pb2 as pb
from modelcache.v1 import modelcache_pb2_grpc as pb_grpc

_BOUND = re.compile(rb"gRPC on 127\.\d+\.\d+\.\d+:(\d+) \(")
_METRICS = re.compile(rb"metrics on http://127\.0\.0\.1:(\d+)/metrics")
REPO = Path(__file__).resolve().parents[1]


def proc_status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as a dict (VmRSS in kB, Threads, ...)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def rss_bytes(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0]) * 1024


def thread_count(pid: int) -> int:
    return int(proc_status(pid)["Threads"])


class ServeProcess:
    """One ``modelcache serve`` child. ``start()`` returns once gRPC answers (models may
    still be loading); ``wait_settled()`` waits until no model is pending or loading."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        *,
        port: int = 0,
        env: dict[str, str] | None = None,
        name: str = "daemon",
        host: str = "127.0.0.1",
    ) -> None:
        self.config, self.workdir, self.port, self.host = config, workdir, port, host
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **(env or {}),
        }
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{name}.log"
        self.starts = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 120.0) -> ServeProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / f"{self.name}.yaml"
        cfg.write_text(yaml.safe_dump(self.config))
        self.starts += 1
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "modelcache.cli",
                    "serve",
                    "--config",
                    str(cfg),
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                    "--metrics-port",
                    "0",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
            )
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                found = _BOUND.search(f.read())
            if found:
                self.port = int(found.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(
                    f"{self.name} did not start in {timeout}s:\n{self.log()[-3000:]}"
                )
            time.sleep(0.02)

    def metrics_url(self, timeout: float = 30.0) -> str:
        """The /metrics address this run of the daemon logged (it starts after gRPC)."""
        deadline = time.monotonic() + timeout
        while True:
            found = _METRICS.findall(self.log_path.read_bytes())
            if len(found) >= self.starts:
                return f"http://127.0.0.1:{int(found[-1])}/metrics"
            assert self.alive() and time.monotonic() < deadline, "no metrics endpoint logged"
            time.sleep(0.02)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``, from the
        daemon's /metrics (0 when there are none)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.metrics_url(), timeout=10) as resp:
            text = resp.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += float(sample.value)
        return total

    def list_models(self, timeout: float = 10.0) -> pb.ListModelsResponse:
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.ModelCacheStub(channel)  # type: ignore[no-untyped-call]
            return stub.ListModels(pb.ListModelsRequest(), timeout=timeout)

    def states(self) -> dict[str, int]:
        return {m.name: m.state for m in self.list_models().models}

    def wait_settled(self, timeout: float = 300.0) -> pb.ListModelsResponse:
        """Wait until every model is READY or FAILED; return the listing."""
        deadline = time.monotonic() + timeout
        unsettled = (pb.ModelStatus.PENDING, pb.ModelStatus.LOADING)
        while True:
            assert self.alive(), f"{self.name} died:\n{self.log()[-3000:]}"
            listing = self.list_models()
            if not any(m.state in unsettled for m in listing.models):
                return listing
            assert time.monotonic() < deadline, f"models still loading after {timeout}s"
            time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` and reap the process; returns its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(60)

    def stop(self) -> int:
        """SIGTERM (graceful stop), SIGKILL if it does not exit within a minute."""
        return self.kill(signal.SIGTERM) if self.proc is not None else 0

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.alive():
            self.stop()
