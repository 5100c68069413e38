"""A running daemon follows its configuration file: re-read on change, applied live.

Kubernetes updates a ConfigMap volume by swapping a symlink (``..data``) up to a minute
after the ConfigMap changed, so the file is polled by content (every ``poll_s`` seconds,
path re-resolved each time), not watched by inode; SIGHUP re-reads it at once. A file that
does not parse or validate changes nothing: the daemon keeps its model set, logs why and
counts it (``modelcache_config_reloads_total{result="invalid"}``), and tries again only
when the content changes. Reading and applying run off the event loop.

The hash of the bytes applied last is the daemon's *config hash* (ListModels
``config_hash``): the operator compares it with the ConfigMap it wrote to tell which pods
run the current configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import yaml

from modelcache.config import ConfigError, DaemonConfig, parse_config
from modelcache.daemon.changes import ConfigChanges
from modelcache.metrics import CONFIG_RELOADS

log = logging.getLogger(__name__)


def config_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def parse_bytes(data: bytes, origin: str) -> DaemonConfig:
    try:
        loaded = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"configuration {origin} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"configuration {origin} must be a mapping with a 'models' list")
    return parse_config(loaded, origin=origin)


class ConfigWatcher:
    """Polls ``path``; calls ``apply(config)`` (on a thread) for each new valid content."""

    def __init__(
        self,
        path: Path,
        applied: bytes,
        apply: Callable[[DaemonConfig, str], ConfigChanges],
        poll_s: float,
    ) -> None:
        self.path, self.poll_s, self._apply = path, poll_s, apply
        self.hash = config_hash(applied)
        self._seen = self.hash  # last content looked at, valid or not
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def reload(self) -> None:
        """SIGHUP: look now."""
        self._wake.set()

    async def check(self) -> ConfigChanges | None:
        """Read the file once; apply it if its content is new and valid."""
        loop = asyncio.get_running_loop()
        try:
            data = await loop.run_in_executor(None, self.path.read_bytes)
        except OSError as exc:
            if self._seen != "unreadable":
                log.error(
                    "cannot read configuration %s: %s; keeping the current one", self.path, exc
                )
                CONFIG_RELOADS.labels(result="unreadable").inc()
                self._seen = "unreadable"
            return None
        digest = config_hash(data)
        if digest == self._seen:
            return None
        self._seen = digest
        try:
            config = parse_bytes(data, str(self.path))
        except ConfigError as exc:
            log.error("%s\nkeeping the configuration %s", exc, self.hash)
            CONFIG_RELOADS.labels(result="invalid").inc()
            return None
        changes = await loop.run_in_executor(None, self._apply, config, digest)
        self.hash = digest
        CONFIG_RELOADS.labels(result="applied").inc()
        log.info("configuration %s applied: %s", digest, changes.summary())
        return changes

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # poll 0: only SIGHUP wakes it
                await asyncio.wait_for(self._wake.wait(), self.poll_s or None)
            self._wake.clear()
            try:
                await self.check()
            except Exception:  # the watcher must outlive any one bad reload
                log.exception("applying the configuration failed")
                CONFIG_RELOADS.labels(result="error").inc()
