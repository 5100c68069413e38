"""``modelcache fetch``: keep every hub model of a configuration on the model volume.

Runs in the daemon pod's ``fetch`` container (the only one with network access to the hub
and write access to the volume; the daemon stays offline and mounts it read-only). It
downloads each hub model that is missing, at start and again whenever the configuration
file changes (polled, like the daemon), so a model added at run time arrives without any
restart; the daemon's retry picks it up.

Shared volumes (ReadWriteMany, NFS): one download per model revision across every replica.
The lock is a directory created with ``mkdir`` (atomic on NFS, unlike ``flock``), holding
its owner; the holder touches it while downloading, and a lock untouched for
``STALE_AFTER_S`` belongs to a dead pod and is broken. Others wait and then find the model
in place. Temporary directories (``.tmp-*``) whose lock is not held are leftovers of a
crash and are removed.

Progress files (``ROOT/.modelcache-fetch/<key>.json``: downloading / failed + error / done)
let the daemon tell "still downloading" from "missing" (``fetch_state``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelcache.config import ConfigError, DaemonConfig, ModelSpec, load_config
from modelcache.daemon.download import destination, download
from modelcache.daemon.errors import ModelLoadError

log = logging.getLogger(__name__)
STATE_DIR = ".modelcache-fetch"
STALE_AFTER_S = 600.0
HEARTBEAT_S = 30.0


def _key(dest: Path, root: Path) -> str:
    return hashlib.sha256(dest.relative_to(root).as_posix().encode()).hexdigest()[:24]


def progress_file(root: Path, dest: Path) -> Path:
    return root / STATE_DIR / f"{_key(dest, root)}.json"


def write_progress(root: Path, dest: Path, state: str, error: str = "") -> None:
    path = progress_file(root, dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"dest": dest.relative_to(root).as_posix(), "state": state, "error": error}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({**body, "updated": time.time()}))
    os.replace(tmp, path)


def fetch_state(root: Path, spec: ModelSpec) -> dict[str, Any] | None:
    """What the fetch container last said about a hub model (None: nothing)."""
    if not spec.is_hub_id or spec.revision is None:
        return None
    try:
        data = json.loads(
            progress_file(root, destination(spec.source, root, spec.revision)).read_text()
        )
    except (OSError, ValueError, ModelLoadError):
        return None
    return data if isinstance(data, dict) else None


def missing_reason(
    root: Path | None, spec: ModelSpec, exc: ModelLoadError
) -> tuple[bool, ModelLoadError]:
    """A hub model missing from the volume: is the fetch container still downloading it
    (True: not a failure, the daemon looks again soon), or did it fail (its reason)?"""
    if exc.error_class != "not_found" or root is None:
        return False, exc
    state = fetch_state(root, spec)
    if state is None:
        return False, exc
    if state.get("state") == "downloading":
        return True, ModelLoadError("downloading", "being downloaded by the fetch container")
    if state.get("state") == "failed":
        return False, ModelLoadError("download", str(state.get("error", ""))[:1000])
    return False, exc


@contextlib.contextmanager
def model_lock(dest: Path) -> Iterator[None]:
    """Hold the download lock of ``dest`` (waits for another holder; breaks stale locks)."""
    lock = dest.with_name(f".lock-{dest.name}")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            lock.mkdir()
            break
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - lock.stat().st_mtime > STALE_AFTER_S:
                    log.warning("breaking the stale download lock %s", lock)
                    stale = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
                    os.rename(lock, stale)
                    shutil.rmtree(stale, ignore_errors=True)
                    continue
            time.sleep(2.0)
    (lock / "owner").write_text(f"{socket.gethostname()} pid {os.getpid()}\n")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(lock)

    thread = threading.Thread(target=beat, name="fetch-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        shutil.rmtree(lock, ignore_errors=True)


def clean_leftovers(dest: Path) -> None:
    """``.tmp-<name>-*`` next to ``dest``: a crashed download's; only the lock holder calls
    this, so nobody is writing them."""
    if dest.parent.is_dir():
        for tmp in dest.parent.glob(f".tmp-{dest.name}-*"):
            log.info("removing the leftover %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def fetch_model(spec: ModelSpec, root: Path) -> Path:
    assert spec.revision is not None
    dest = destination(spec.source, root, spec.revision)
    with model_lock(dest):
        clean_leftovers(dest)
        if not dest.is_dir():
            log.info("downloading %s@%s", spec.source, spec.revision[:12])
            write_progress(root, dest, "downloading")
        try:
            download(spec.source, root, spec.revision)
        except ModelLoadError as exc:
            write_progress(root, dest, "failed", f"{exc.error_class}: {exc.message}")
            raise
        except Exception as exc:  # the hub said no (auth, gated, 404) or the network failed
            write_progress(root, dest, "failed", f"{type(exc).__name__}: {exc}")
            raise ModelLoadError("download", f"{type(exc).__name__}: {exc}") from None
        write_progress(root, dest, "done")
    return dest


def fetch_all(config: DaemonConfig, root: Path) -> dict[str, str]:
    """Every hub model of ``config``; returns the failures by model name (others are on
    the volume). One failing model does not stop the others."""
    failures = {}
    for spec in config.models:
        if not spec.is_hub_id:
            continue
        try:
            fetch_model(spec, root)
        except ModelLoadError as exc:
            log.error("model %s: %s", spec.name, exc)
            failures[spec.name] = str(exc)
    return failures


def run(config_path: Path, root: Path, watch: bool, poll_s: float = 5.0) -> int:
    """Fetch once (exit 1 if something failed), or forever, again on every change and
    retrying failures every ``10 * poll_s`` seconds."""
    last: bytes | None = None
    retry_at = 0.0
    while True:
        data = b""
        try:
            data = config_path.read_bytes()
            if data != last or (retry_at and time.monotonic() >= retry_at):
                last = data
                failures = fetch_all(load_config(config_path), root)
                retry_at = time.monotonic() + 10 * poll_s if failures else 0.0
                if not watch:
                    return 1 if failures else 0
        except (OSError, ConfigError) as exc:
            log.error("cannot use %s: %s", config_path, exc)
            last = data  # said once per content
            if not watch:
                return 2
        time.sleep(poll_s)
