"""The daemon assembled: gRPC service, health, reflection, metrics, TLS, graceful stop.

Why ``grpc.aio`` and not the thread-pool server: a synchronous server holds one thread per
in-flight RPC, and an RPC here spends nearly all its time waiting for its batch. With 32
clients and ``grpc_threads`` = 16, half of them would queue inside gRPC, invisible to the
batcher, so they could neither be merged into batches nor be refused early. On the event
loop a waiting RPC costs a coroutine; cancellation and deadlines arrive as
``CancelledError`` in the handler, which drops the request from the batch queue. The
blocking work is kept off the loop: tokenization on a thread pool (``grpc_threads``
threads), forward passes on one worker thread per model (batcher.py).

Start-up order: the registry is prepared on the main thread before anything else (seed
003), the server starts answering (health NOT_SERVING, models UNAVAILABLE) and loads run in
the background; each model becomes servable, and its health SERVING, when its load
completes. SIGTERM/SIGINT: every health service turns NOT_SERVING, the server stops
accepting and gives in-flight RPCs ``GRACE_S`` to finish, then the workers stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from modelcache.config import DaemonConfig
from modelcache.daemon.batcher import Batcher
from modelcache.daemon.health import HealthReporter, Watchdog, health_handler
from modelcache.daemon.inference import ModelCompute
from modelcache.daemon.loader import record_build_info
from modelcache.daemon.registry import ModelRegistry, ModelState
from modelcache.daemon.servicer import SERVICE, ModelCacheServicer, ServedModel
from modelcache.metrics import DAEMON_REGISTRY
from modelcache.settings import DaemonSettings

log = logging.getLogger(__name__)
GRACE_S = 10.0


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def server_credentials(settings: DaemonSettings) -> grpc.ServerCredentials | None:
    """TLS when a certificate and key are set; mutual TLS when a client CA is set too."""
    if settings.tls_cert is None and settings.tls_key is None:
        if settings.tls_client_ca is not None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key as well")
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ValueError("TLS needs both tls_cert and tls_key")
    ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def lower_thread_priority(nice: int) -> None:
    """Run the calling thread at niceness ``nice`` (never higher priority than it had).

    The admission threads tokenize the next requests while a batch runs. On a CPU device the
    forward pass's intra-op threads use every core, and a tokenizer taking one of them stalls
    all of them at the next barrier (measured on 2 cores: -15 to -25 % throughput). At a low
    priority the tokenizers use what the pass leaves. The price: a niced thread preempted
    while it holds the GIL keeps the event loop waiting, so refusals and health checks get
    slower under load; hence opt-in (``MODELCACHE_ADMIT_NICE``), for throughput-bound CPU
    serving. Linux applies setpriority to one thread when given its thread id.
    """
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if nice > current:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:  # e.g. a seccomp profile without setpriority: run as is
        log.warning("cannot lower the priority of admission thread %d: %s", tid, exc)


class DaemonServer:
    """One gRPC server over a prepared registry. ``start``/``stop`` run on its event loop."""

    def __init__(
        self, config: DaemonConfig, settings: DaemonSettings, registry: ModelRegistry
    ) -> None:
        self.config, self.settings, self.registry = config, settings, registry
        self.port = 0
        self.metrics_port = 0
        self._metrics: Any = None

    async def start(self) -> int:
        """Bind, start serving and return the port (useful with port 0)."""
        s = self.settings
        self.executor = ThreadPoolExecutor(
            s.grpc_threads,
            thread_name_prefix="modelcache-admit",
            initializer=lower_thread_priority,
            initargs=(s.admit_nice,),
        )
        self.servicer = ModelCacheServicer(self.registry, self.config.batching, self.executor)
        self.health = health.aio.HealthServicer()
        self.reporter = HealthReporter(
            self.health, self.registry, self.servicer.served, asyncio.get_running_loop()
        )
        self.watchdog = Watchdog(self.servicer.served, self.reporter, s.watchdog_interval)
        self.registry.add_listener(self._on_state)
        for entry in self.registry.entries():
            if entry.state is ModelState.READY:
                self._on_state(entry.spec.name, entry.state)
        await self.reporter.publish()

        limit = s.grpc_max_message_bytes
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        self.server.add_generic_rpc_handlers((self.servicer.handler(),))
        self.server.add_generic_rpc_handlers((health_handler(self.health),))
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        address = _address(s.host, s.port)
        creds = server_credentials(s)
        try:
            self.port = (
                self.server.add_secure_port(address, creds)
                if creds
                else self.server.add_insecure_port(address)
            )
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from None
        await self.server.start()
        self.watchdog.start()
        log.info("gRPC on %s (%s)", _address(s.host, self.port), "TLS" if creds else "plaintext")
        return self.port

    def start_metrics(self) -> int:
        self._metrics, _ = start_http_server(
            self.settings.metrics_port, addr=self.settings.metrics_host, registry=DAEMON_REGISTRY
        )
        self.metrics_port = int(self._metrics.server_port)
        log.info(
            "metrics on http://%s/metrics", _address(self.settings.metrics_host, self.metrics_port)
        )
        return self.metrics_port

    async def stop(self, grace: float = GRACE_S) -> None:
        await self.reporter.shutdown()
        await self.server.stop(grace)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._stop_threads)
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()

    def _stop_threads(self) -> None:
        self.watchdog.stop()
        for served in self.servicer.served().values():
            served.batcher.stop()
        self.executor.shutdown(wait=True, cancel_futures=True)

    def _on_state(self, name: str, state: ModelState) -> None:
        """Registry listener (loader thread): a READY model gets its worker; a model that
        leaves READY loses it. Then health is republished."""
        if self.reporter.closed:
            return
        if state is ModelState.READY:
            loaded = self.registry.entry(name).loaded
            if loaded is not None and name not in self.servicer.served():
                compute = ModelCompute(loaded)
                method = "Embed" if loaded.spec.task == "embedding" else "LogProbs"
                batcher = Batcher(
                    name, method, compute.run, self.config.batching, on_death=self.watchdog.wake
                )
                batcher.start()
                self.servicer.attach(name, ServedModel(compute, batcher))
        elif (old := self.servicer.detach(name)) is not None:
            old.batcher.stop()
        self.reporter.refresh()


def _freeze_when_ready(name: str, state: ModelState) -> None:
    """Registry listener of the serving process: once a model is loaded, everything alive
    (torch, transformers, the model's modules: ~400k objects with MiniLM) moves out of the
    garbage collector's reach. Otherwise every full collection under load walks all of it
    (170-200 ms measured), and every request in flight waits: that pause was the p99 of
    the refusals under overload. Collected first, so no garbage is frozen."""
    if state is ModelState.READY:
        gc.collect()
        gc.freeze()


async def _release_loader(registry: ModelRegistry, loads: list[Future[Any]]) -> None:
    """Once every load has finished, let the registry's loader thread exit.

    The thread ran each model's warm-up forward, so it owns an OpenMP thread pool; while
    it lives, libgomp counts more threads than cores and throttles spin-waiting for every
    team, the batch workers' included: forward passes measured 20-35% slower on 2 cores
    (a 38-token MiniLM forward 14.7 -> 20.5 ms, batch-32 encode 117 -> 106 sentences/s).
    The serving path never loads again (a failed model stays failed until a restart), so
    the registry is closed for loading here; listing and lookups keep working.
    """
    for load in loads:
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(load)
    registry.close()
    log.info("all loads finished; loader thread released")


async def _run(server: DaemonServer) -> None:
    await server.start()
    server.start_metrics()
    server.registry.add_listener(_freeze_when_ready)
    release = asyncio.ensure_future(_release_loader(server.registry, server.registry.start_all()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    release.cancel()
    log.info("stopping: health NOT_SERVING, draining in-flight requests (%.0fs grace)", GRACE_S)
    await server.stop()


def serve(config: DaemonConfig, settings: DaemonSettings) -> None:
    """Run the daemon until SIGTERM or SIGINT, then stop gracefully. Main thread only."""
    registry = ModelRegistry(config)
    registry.prepare()
    record_build_info()
    try:
        asyncio.run(_run(DaemonServer(config, settings, registry)))
    finally:
        registry.close()
