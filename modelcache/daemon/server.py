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
accepting and gives in-flight RPCs ``drain_s`` to finish, then the workers stop.

The model set is live (live.py, changes.py): when the config file changes, added models
load, removed ones stop admitting (NOT_FOUND), drain what they admitted and are freed, and a
changed model keeps serving its old weights until the new load is verified; then the new
weights take the next requests while the old batcher drains. Each request is computed by one
batcher, so no response mixes old and new weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from modelcache.config import DaemonConfig
from modelcache.daemon.changes import ConfigChanges
from modelcache.daemon.health import SERVING, HealthReporter, Watchdog, health_handler
from modelcache.daemon.inference import set_tf32
from modelcache.daemon.live import ConfigWatcher, config_hash
from modelcache.daemon.loader import record_build_info
from modelcache.daemon.loadthread import Backoff
from modelcache.daemon.probes import Heartbeat, ProbeApp, ProbeServer
from modelcache.daemon.registry import ModelRegistry, ModelState
from modelcache.daemon.servicer import SERVICE, ModelCacheServicer
from modelcache.daemon.workers import ModelWorkers, freeze_heap
from modelcache.settings import DaemonSettings

log = logging.getLogger(__name__)
#: Exit status after a device failure that poisons the CUDA context (health.py): the
#: process must be replaced, and a non-zero status makes the kubelet restart it.
EXIT_DEVICE_LOST = 3


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
        self,
        config: DaemonConfig,
        settings: DaemonSettings,
        registry: ModelRegistry,
        config_digest: str = "",
    ) -> None:
        self.config, self.settings, self.registry = config, settings, registry
        self.config_hash = config_digest
        self.port = 0
        self.metrics_port = 0
        self._metrics: ProbeServer | None = None
        self.heartbeat = Heartbeat()
        self._apply_lock = threading.Lock()
        self.exit_code = 0  # non-zero: the process must exit with it once stopped
        self.stop_requested = asyncio.Event()  # set by SIGTERM/SIGINT or a lost device

    async def start(self) -> int:
        """Bind, start serving and return the port (useful with port 0)."""
        s = self.settings
        self.executor = ThreadPoolExecutor(
            s.grpc_threads,
            thread_name_prefix="modelcache-admit",
            initializer=lower_thread_priority,
            initargs=(s.admit_nice,),
        )
        self.servicer = ModelCacheServicer(
            self.registry, self.config.batching, self.executor, lambda: self.config_hash
        )
        self.health = health.aio.HealthServicer()
        self.reporter = HealthReporter(
            self.health, self.registry, self.servicer.served, asyncio.get_running_loop()
        )
        self._loop = asyncio.get_running_loop()
        self.watchdog = Watchdog(
            self.servicer.served, self.reporter, s.watchdog_interval, self._device_lost
        )
        self.workers = ModelWorkers(
            self.registry,
            self.servicer,
            self.reporter,
            lambda: self.config.batching,
            self.watchdog.wake,
            s.drain_s,
        )
        self.registry.add_listener(self.workers.on_state)
        for entry in self.registry.entries():
            if entry.state is ModelState.READY:
                self.workers.on_state(entry.spec.name, entry.state)
        await self.reporter.publish()

        limit = s.grpc_max_message_bytes
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ]
        if s.max_connection_age_s > 0:  # clients re-resolve and find new replicas
            options += [
                ("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(s.max_connection_age_grace_s * 1000)),
            ]
        self.server = grpc.aio.server(options=options)
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
        self.heartbeat.start()
        log.info("gRPC on %s (%s)", _address(s.host, self.port), "TLS" if creds else "plaintext")
        return self.port

    def _device_lost(self, reason: str) -> None:
        """Watchdog thread: a device failed for good; stop the way SIGTERM does, then exit
        with EXIT_DEVICE_LOST (``serve``) so the container is restarted."""
        self.exit_code = EXIT_DEVICE_LOST
        with contextlib.suppress(RuntimeError):  # a closed loop: the server is gone already
            self._loop.call_soon_threadsafe(self.stop_requested.set)

    def start_metrics(self) -> int:
        """/metrics, /readyz and /livez on the metrics port (probes.py)."""
        app = ProbeApp(
            statuses=lambda: {
                k: v == SERVING for k, v in self.reporter.statuses().items() if k != SERVICE
            },
            stalled=lambda: sorted(
                n for n, s in self.servicer.served().items() if s.batcher.stalled()
            ),
            heartbeat=self.heartbeat,
            loop_stall_s=self.settings.liveness_loop_stall_s,
        )
        self._metrics = ProbeServer(app, self.settings.metrics_host, self.settings.metrics_port)
        self._metrics.start()
        self.metrics_port = self._metrics.port
        log.info(
            "metrics on http://%s/metrics (probes: /readyz, /livez)",
            _address(self.settings.metrics_host, self.metrics_port),
        )
        return self.metrics_port

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.drain_s if grace is None else grace
        self.heartbeat.stop()
        await self.reporter.shutdown()
        await self.server.stop(grace)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._stop_threads)
        if self._metrics is not None:
            self._metrics.stop()

    def apply(self, config: DaemonConfig, digest: str) -> ConfigChanges:
        """A new configuration, live (a thread, never the event loop): the registry adds,
        removes and reloads models (their workers follow: workers.py); batching limits
        and the log level apply at once."""
        with self._apply_lock:
            changes = self.registry.apply(config)
            self.config = config
            if changes.batching:
                self.servicer.cfg = config.batching
                for served in self.servicer.served().values():
                    served.batcher.reconfigure(config.batching)
            if changes.log_level:
                level = config.log_level or self.settings.log_level
                logging.getLogger().setLevel(level.upper())
            set_tf32(config.tf32)
            self.config_hash = digest
        self.reporter.refresh()
        return changes

    def _stop_threads(self) -> None:
        self.watchdog.stop()
        for served in self.servicer.served().values():
            served.batcher.stop()
        self.executor.shutdown(wait=True, cancel_futures=True)


async def _run(server: DaemonServer) -> None:
    await server.start()
    server.start_metrics()
    server.registry.add_idle_listener(freeze_heap)
    server.registry.start_all()
    watcher = None
    if server.settings.config is not None:
        watcher = ConfigWatcher(
            server.settings.config,
            server.settings.config.read_bytes(),
            server.apply,
            server.settings.config_poll_s,
        )
        watcher.hash = server.config_hash or watcher.hash
        watcher.start()
    stop = server.stop_requested
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if watcher is not None:
        loop.add_signal_handler(signal.SIGHUP, watcher.reload)
    await stop.wait()
    if watcher is not None:
        watcher.stop()
    delay = server.settings.shutdown_delay_s
    if delay > 0:
        await server.reporter.shutdown()
        log.info("stopping: NOT_SERVING, still answering for %.0fs", delay)
        await asyncio.sleep(delay)
    log.info("stopping: draining in-flight requests (%.0fs grace)", server.settings.drain_s)
    await server.stop()


def serve(config: DaemonConfig, settings: DaemonSettings) -> None:
    """Run the daemon until SIGTERM or SIGINT, then stop gracefully. Main thread only."""
    registry = ModelRegistry(config, Backoff(settings.retry_initial_s, settings.retry_max_s))
    registry.prepare()
    record_build_info()
    set_tf32(config.tf32)
    digest = config_hash(settings.config.read_bytes()) if settings.config is not None else ""
    server = DaemonServer(config, settings, registry, digest)
    try:
        asyncio.run(_run(server))
    finally:
        try:
            registry.close()
        except Exception:
            # After a lost device, freeing its memory can fail on the poisoned context; the
            # exit status that asks for a restart must survive that.
            if not server.exit_code:
                raise
            log.exception("closing the registry after a device failure")
        if server.exit_code:
            log.critical("exiting with status %d so that the daemon is restarted", server.exit_code)
            raise SystemExit(server.exit_code)
