"""A worker per READY model: what the server runs for each model the registry loaded.

Why apart from the server: this is the one place where the registry's state changes become
serving changes, on the loader's thread. A model that becomes READY gets a ``ModelCompute``
and a batcher (a new pair when its weights changed: the next requests take the new weights
while the old batcher drains, so no response mixes the two); a model that leaves READY or
the configuration loses its worker, which drains on a thread of its own and then frees its
weights (a full collection, then CUDA's cached blocks).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable

import torch

from modelcache.config import BatchingConfig
from modelcache.daemon.admission import ServedModel
from modelcache.daemon.batcher import Batcher
from modelcache.daemon.health import HealthReporter
from modelcache.daemon.inference import ModelCompute
from modelcache.daemon.registry import ModelRegistry, ModelState
from modelcache.daemon.servicer import ModelCacheServicer
from modelcache.metrics import forget_model

log = logging.getLogger(__name__)


class ModelWorkers:
    """Registry listener: keeps the servicer's workers in step with the registry."""

    def __init__(
        self,
        registry: ModelRegistry,
        servicer: ModelCacheServicer,
        reporter: HealthReporter,
        batching: Callable[[], BatchingConfig],
        on_death: Callable[[], None],
        drain_s: float,
    ) -> None:
        self.registry, self.servicer, self.reporter = registry, servicer, reporter
        self.batching, self.on_death, self.drain_s = batching, on_death, drain_s

    def on_state(self, name: str, state: ModelState) -> None:
        """Registry listener (loader thread, or the thread applying a config): a READY model
        gets its worker — a new one, replacing the old, when its weights changed; a model
        that leaves READY, or the configuration, loses it. Then health is republished."""
        if self.reporter.closed:
            return
        if state is ModelState.READY:
            try:
                loaded = self.registry.entry(name).loaded
            except KeyError:  # removed meanwhile
                loaded = None
            current = self.servicer.served().get(name)
            if loaded is not None and (current is None or current.compute.loaded is not loaded):
                compute = ModelCompute(loaded)
                method = "Embed" if loaded.spec.task == "embedding" else "LogProbs"
                batcher = Batcher(
                    name, method, compute.run, self.batching(), on_death=self.on_death
                )
                batcher.start()
                self.servicer.attach(name, ServedModel(compute, batcher))
                if current is not None:
                    self._retire(name, current, gone=False)
        elif (old := self.servicer.detach(name)) is not None:
            self._retire(name, old, gone=state is ModelState.REMOVED)
        elif state is ModelState.REMOVED:
            forget_model(name)
        self.reporter.refresh()

    def _retire(self, name: str, old: ServedModel, gone: bool) -> None:
        """Drain ``old`` (every admitted request is answered) and free its weights, on a
        thread of its own: a batch may be running, and the caller is the loader."""

        holder = [old]  # the thread's only reference, dropped before the memory is released

        def run() -> None:
            try:
                served = holder.pop()
                drained = served.batcher.drain(self.drain_s)
                device = served.compute.device
                del served
                if gone and name not in self.registry.names():
                    forget_model(name)
                release_memory(device)
                log.info(
                    "model %s: %s weights released%s",
                    name,
                    "its" if gone else "the old",
                    "" if drained else f" (requests still queued after {self.drain_s:.0f}s failed)",
                )
            except Exception:
                log.exception("model %s: retiring its old worker failed", name)

        del old
        threading.Thread(target=run, name=f"retire-{name}", daemon=True).start()


def freeze_heap() -> None:
    """Registry idle listener of the serving process: once no load runs, everything alive
    (torch, transformers, the models' modules: ~400k objects with MiniLM) moves out of the
    garbage collector's reach. Otherwise every full collection under load walks all of it
    (170-200 ms measured), and every request in flight waits: that pause was the p99 of
    the refusals under overload. Collected first, so no garbage is frozen; and never while
    a load (on any device) is half done, whose failure must leave collectable garbage."""
    gc.collect()
    gc.freeze()


def release_memory(device: torch.device) -> None:
    """Give a dropped model's memory back: a full collection (over the objects frozen by
    ``freeze_heap`` too, for any cycle holding tensors), then CUDA's cached blocks."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    if device.type == "cuda":
        torch.cuda.empty_cache()
