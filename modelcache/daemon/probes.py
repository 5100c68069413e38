"""The metrics port: Prometheus metrics, and the HTTP probes Kubernetes uses.

- ``/metrics``: the daemon's registry (prometheus_client's own WSGI app: content
  negotiation, gzip).
- ``/readyz``: 200 when every configured model is READY with a live worker (what the
  gRPC health service ``""`` says), else 503; the body lists each model's state. A pod is
  put behind its Services only when this passes, so a pod still loading — or one whose
  model failed — gets no traffic.
- ``/livez``: 200 while the daemon makes progress: its event loop ran within
  ``loop_stall_s`` and no batch has been running for longer than its model's stall limit
  (a hung device). A loading model is alive. 503 otherwise: the kubelet restarts the
  container, the only cure for a stuck loop or a wedged device.

Plain HTTP on the metrics port on purpose: it works whether the gRPC port has TLS or mutual
TLS, and with every Kubernetes version (gRPC probes need 1.24+ and cannot present a client
certificate). The handlers run on the server's threads and read thread-safe snapshots; they
never wait for the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from modelcache.metrics import DAEMON_REGISTRY

log = logging.getLogger(__name__)
StartResponse = Callable[..., Any]
#: Serving statuses by service name ("" = overall), from health.HealthReporter.
Statuses = Callable[[], dict[str, bool]]
Stalled = Callable[[], list[str]]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood the log."""


class Heartbeat:
    """Proof that the event loop runs: a task stamps the time every ``interval`` seconds."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.last = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._beat())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def age(self) -> float:
        return time.monotonic() - self.last

    async def _beat(self) -> None:
        while True:
            self.last = time.monotonic()
            await asyncio.sleep(self.interval)


class ProbeApp:
    """The WSGI application of the metrics port."""

    def __init__(
        self, statuses: Statuses, stalled: Stalled, heartbeat: Heartbeat, loop_stall_s: float
    ) -> None:
        self.statuses, self.stalled = statuses, stalled
        self.heartbeat, self.loop_stall_s = heartbeat, loop_stall_s
        self.metrics = make_wsgi_app(DAEMON_REGISTRY)

    def ready(self) -> tuple[bool, dict[str, Any]]:
        statuses = self.statuses()
        overall = statuses.pop("", False)
        return overall, {"ready": overall, "models": statuses}

    def live(self) -> tuple[bool, dict[str, Any]]:
        age = self.heartbeat.age()
        stalled = self.stalled()
        ok = age < self.loop_stall_s and not stalled
        return ok, {"live": ok, "event_loop_seconds_since_beat": round(age, 3), "stalled": stalled}

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/readyz", "/livez"):
            ok, body = self.ready() if path == "/readyz" else self.live()
            data = json.dumps(body, sort_keys=True).encode() + b"\n"
            status = "200 OK" if ok else "503 Service Unavailable"
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
            start_response(status, headers)
            return [data]
        result: Iterable[bytes] = self.metrics(environ, start_response)
        return result


class _Server6(_Server):
    address_family = socket.AF_INET6


class ProbeServer:
    def __init__(self, app: ProbeApp, host: str, port: int) -> None:
        cls = _Server6 if ":" in host else _Server
        self.httpd = make_server(host.strip("[]"), port, app, cls, handler_class=_QuietHandler)
        self.port = int(self.httpd.server_port)
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="modelcache-metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
