"""Real daemons on loopback for the serving and client tests.

``RunningDaemon`` runs the product's ``DaemonServer`` on its own event loop in a
background thread, so that tests on the main thread can use blocking clients, hold the
loader lock, or drive an asyncio client in their own loop. Test modules load it as a
plugin (``pytest_plugins``), so each session fixture exists once for the whole run, and
register it for assertion rewriting before importing its helpers.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import tiny_models
import torch

from modelcache.config import DaemonConfig, parse_config
from modelcache.daemon.registry import ModelRegistry
from modelcache.daemon.server import DaemonServer
from modelcache.examples import bundled_minilm
from modelcache.metrics import DAEMON_REGISTRY
from modelcache.settings import DaemonSettings

T = TypeVar("T")


class RunningDaemon:
    def __init__(
        self,
        config: DaemonConfig,
        registry: ModelRegistry,
        settings: DaemonSettings | None = None,
        metrics: bool = False,
    ) -> None:
        self.config, self.registry = config, registry
        self.settings = settings or DaemonSettings(
            host="127.0.0.1", port=0, metrics_port=0, watchdog_interval=0.5, grpc_threads=4
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="test-daemon-loop", daemon=True
        )
        self.thread.start()
        self.server = DaemonServer(config, self.settings, registry)
        self.port = self.call(self.server.start())
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_port = self.server.start_metrics() if metrics else 0

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 5.0) -> None:
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


def model(name: str, path: Path, task: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "source": str(path), "task": task, **kw}


def minilm_spec(name: str = "minilm") -> dict[str, Any]:
    """The bundled model as ``make run`` serves it."""
    return model(
        name, bundled_minilm(), "embedding", pooling="mean", normalize=True, max_length=256
    )


def metric(name: str, **labels: str) -> float:
    value = DAEMON_REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll a condition that another thread or process makes true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.fixture(scope="session")
def tiny_lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving-models")
    broken = tiny_models.gpt2(root / "broken", seed=9)
    os.truncate(broken / "model.safetensors", 10)
    return {
        "gpt2": tiny_models.gpt2(root / "gpt2"),
        "llama": tiny_models.llama(root / "llama"),
        "bert": tiny_models.bert(root / "bert"),
        "broken": broken,
    }


@pytest.fixture(scope="session")
def session_config(tiny_lms: dict[str, Path]) -> DaemonConfig:
    return parse_config(
        {
            "models": [
                minilm_spec(),
                model("gpt2", tiny_lms["gpt2"], "causal-lm"),
                model("llama", tiny_lms["llama"], "causal-lm"),
                model("bert-cls", tiny_lms["bert"], "embedding", pooling="cls", normalize=False),
                model("broken", tiny_lms["broken"], "causal-lm"),
            ]
        }
    )


@pytest.fixture(scope="session")
def session_registry(session_config: DaemonConfig) -> Iterator[ModelRegistry]:
    registry = ModelRegistry(session_config)
    registry.prepare()
    registry.load_all()
    yield registry
    registry.close()


@pytest.fixture(scope="session")
def daemon(
    session_config: DaemonConfig, session_registry: ModelRegistry
) -> Iterator[RunningDaemon]:
    """One daemon for the session: minilm, gpt2, llama, bert-cls ready; broken failed."""
    running = RunningDaemon(session_config, session_registry, metrics=True)
    yield running
    running.stop()


class ForwardGate:
    """Fault injection on a served model's forward pass (a torch forward pre-hook): record
    the input ids of every forward, block forwards until released, or raise when an input
    contains a marker token."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seen: list[list[int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.raise_on: dict[int, BaseException] = {}
        # The body: a causal LM's log-probs run it and then the head over token slices,
        # never the LM's own forward (an embedder's base_model is itself).
        body = getattr(module, "base_model", module)
        self._handle = body.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows = ids.tolist() if ids is not None else []
        self.seen += rows
        self.entered.set()
        assert self.release.wait(60), "test gate never released"
        for token, exc in self.raise_on.items():
            if any(token in r for r in rows):
                raise exc

    def hold(self) -> None:
        self.entered.clear()
        self.release.clear()

    def close(self) -> None:
        self.release.set()
        self._handle.remove()
