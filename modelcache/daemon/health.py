"""grpc.health.v1 from model states and batch-worker liveness, plus the worker watchdog.

Health services: ``""`` (and ``modelcache.v1.ModelCache``, its alias) is SERVING only when
every configured model is READY with a live worker; ``"<model>"`` is SERVING when that
model is. Kubernetes readiness probes the overall service; a client that needs one model
watches that model's service.

Statuses are always computed on the event loop at the moment they are published, from
the registry and the batchers, so updates triggered from the loader thread, the watchdog
and dying workers can never publish an out-of-date snapshot over a newer one.

The watchdog restarts a worker whose thread ended (its in-flight requests were already
failed by the worker itself): it publishes NOT_SERVING, waits until that is published,
then restarts the worker (counted in modelcache_worker_restarts) or, after more than
``MAX_RESTARTS`` deaths within ``RESTART_WINDOW_S``, fails the batcher: its requests get
FAILED_PRECONDITION with the reason and the model stays NOT_SERVING, rather than a
poisoned model crash-looping forever. It wakes at once when a worker dies and
also every ``watchdog_interval`` seconds, when it samples device memory and looks for a
batch that has run for longer than ``stall_after`` (a hung device): such a model is
NOT_SERVING until the batch returns, so a load balancer stops sending it work.

A worker whose device failed for good (a device-side assert, an illegal memory access:
devicefaults.py) is never restarted — the CUDA context is poisoned for the whole process.
The watchdog publishes NOT_SERVING, waits until that is visible, and calls ``on_fatal``: the
server stops through its usual graceful path and the process exits non-zero, so the
kubelet restarts the container with a fresh context.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2

from modelcache.daemon.admission import ServedModel
from modelcache.daemon.registry import ModelRegistry, ModelState
from modelcache.daemon.servicer import SERVICE
from modelcache.metrics import DEVICE_MEMORY_BYTES, WORKER_RESTARTS

log = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
Served = Callable[[], dict[str, ServedModel]]
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


class HealthReporter:
    def __init__(
        self,
        servicer: health.aio.HealthServicer,
        registry: ModelRegistry,
        served: Served,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.servicer, self.registry, self.served, self.loop = servicer, registry, served, loop
        self.closed = False
        self._published: set[str] = set()

    def statuses(self) -> dict[str, int]:
        served = self.served()
        out: dict[str, int] = {}
        for e in self.registry.entries():
            s = served.get(e.spec.name)
            ok = (
                not self.closed
                and e.state is ModelState.READY
                and s is not None
                and s.batcher.healthy()
            )
            out[e.spec.name] = SERVING if ok else NOT_SERVING
        overall = SERVING if all(v == SERVING for v in out.values()) else NOT_SERVING
        out[health.OVERALL_HEALTH] = out[SERVICE] = overall
        return out

    async def publish(self) -> None:
        statuses = self.statuses()
        # A model no longer configured: its watchers hear SERVICE_UNKNOWN (grpc.health.v1).
        for gone in self._published - statuses.keys():
            await self.servicer.set(gone, SERVICE_UNKNOWN)
        self._published = set(statuses)
        for service, status in statuses.items():
            await self.servicer.set(service, status)

    def refresh(self) -> concurrent.futures.Future[None] | None:
        """Publish from any thread; the returned future completes once published."""
        if self.closed:
            return None
        try:
            return asyncio.run_coroutine_threadsafe(self.publish(), self.loop)
        except RuntimeError:  # the loop is closed: the server is gone
            return None

    async def shutdown(self) -> None:
        """Every service NOT_SERVING (and /readyz 503) from now on; idempotent."""
        if self.closed:
            return
        self.closed = True
        await self.servicer.enter_graceful_shutdown()


def sample_device_memory(devices: set[str]) -> None:
    """modelcache_device_memory_bytes: process RSS, and per CUDA device its allocator."""
    try:
        with open("/proc/self/statm") as f:
            rss_pages = int(f.read().split()[1])
        DEVICE_MEMORY_BYTES.labels("cpu", "rss").set(rss_pages * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        pass
    for dev in sorted(d for d in devices if d.startswith("cuda")):
        d = torch.device(dev)
        DEVICE_MEMORY_BYTES.labels(dev, "allocated").set(torch.cuda.memory_allocated(d))
        DEVICE_MEMORY_BYTES.labels(dev, "reserved").set(torch.cuda.memory_reserved(d))
        DEVICE_MEMORY_BYTES.labels(dev, "total").set(
            torch.cuda.get_device_properties(d).total_memory
        )


def health_handler(servicer: health.aio.HealthServicer) -> grpc.GenericRpcHandler:
    """grpc.health.v1.Health (Check, Watch) with requests parsed here rather than by gRPC,
    whose own deserializer answers a malformed request with UNKNOWN (which reads as a
    server fault): here it is INVALID_ARGUMENT naming the type, like the ModelCache RPCs."""

    async def parse(raw: bytes, ctx: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return health_pb2.HealthCheckRequest.FromString(raw)
        except (DecodeError, ValueError) as exc:
            await ctx.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request is not a valid grpc.health.v1.HealthCheckRequest: {exc}",
            )
            raise AssertionError("unreachable: abort raises") from None

    async def check(raw: bytes, ctx: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await servicer.Check(await parse(raw, ctx), ctx)

    async def watch(raw: bytes, ctx: grpc.aio.ServicerContext[Any, Any]) -> None:
        await servicer.Watch(await parse(raw, ctx), ctx)

    out = health_pb2.HealthCheckResponse.SerializeToString
    return grpc.method_handlers_generic_handler(
        health.SERVICE_NAME,
        {
            "Check": grpc.unary_unary_rpc_method_handler(check, response_serializer=out),
            "Watch": grpc.unary_stream_rpc_method_handler(watch, response_serializer=out),
        },
    )


class Watchdog:
    def __init__(
        self,
        served: Served,
        reporter: HealthReporter,
        interval: float,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.served, self.reporter, self.interval = served, reporter, interval
        self.on_fatal = on_fatal
        self.fatal: str = ""  # the first device failure, once reported
        self._wake = threading.Event()
        self._deaths: dict[str, list[float]] = {}
        self._stalled: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="modelcache-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Called by a dying worker (from its own thread)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check()
            except Exception:  # the watchdog itself must survive anything
                log.exception("watchdog check failed")

    def check(self) -> None:
        served = self.served()
        stalled = {name for name, s in served.items() if s.batcher.stalled()}
        if stalled != self._stalled:
            for name in stalled - self._stalled:
                log.error(
                    "model %s: one batch has been running for over %.0fs; reporting "
                    "NOT_SERVING until it returns",
                    name,
                    served[name].batcher.stall_after,
                )
            self._stalled = stalled
            self.reporter.refresh()
        lost = [s.batcher.device_lost for s in served.values() if s.batcher.device_lost]
        if lost and not self.fatal:
            self.fatal = lost[0]
            log.critical("%s; stopping the daemon", self.fatal)
            self._publish_and_wait()  # NOT_SERVING is visible before the process goes
            if self.on_fatal is not None:
                self.on_fatal(self.fatal)
        for name, s in served.items():
            if not s.batcher.dead():
                continue
            log.error("model %s: batch worker died (%s)", name, s.batcher.last_death)
            self._publish_and_wait()  # NOT_SERVING is visible before the restart
            self.restart(name, s)
            self.reporter.refresh()
        sample_device_memory({str(s.compute.device) for s in served.values()})

    def restart(self, name: str, served: ServedModel) -> bool:
        """Restart a dead worker, or fail its batcher when it died too often."""
        now = time.monotonic()
        deaths = [t for t in self._deaths.get(name, []) if now - t < RESTART_WINDOW_S] + [now]
        self._deaths[name] = deaths
        if len(deaths) > MAX_RESTARTS:
            served.batcher.fail_permanently(
                f"its batch worker died {len(deaths)} times in {RESTART_WINDOW_S:.0f}s; "
                f"last: {served.batcher.last_death}"
            )
            return False
        WORKER_RESTARTS.labels(model=name).inc()
        served.batcher.start()
        log.warning("model %s: batch worker restarted", name)
        return True

    def _publish_and_wait(self) -> None:
        fut = self.reporter.refresh()
        if fut is not None:
            try:
                fut.result(timeout=5.0)
            except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
                log.warning("health update did not complete within 5s")
