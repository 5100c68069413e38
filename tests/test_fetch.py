"""`modelcache fetch` (the pod's fetch container): one download per model revision across
replicas sharing a volume, leftovers cleaned, progress the daemon reads.

No hub is reachable here: the transfer itself is the tested `download` of a local directory
(test_download.py); these tests replace only the hub transfer and keep the locks, progress
files and the daemon's reading of them real."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import tiny_models

from modelcache.config import parse_config
from modelcache.daemon import download as download_module
from modelcache.daemon import fetch
from modelcache.daemon.errors import ModelLoadError
from modelcache.daemon.registry import ModelRegistry, ModelState

SHA = "0123456789abcdef0123456789abcdef01234567"


def hub_spec(name: str = "tiny", source: str = "org/tiny") -> dict[str, Any]:
    return {"name": name, "source": source, "revision": SHA, "task": "embedding"}


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The hub transfer as a copy of a tiny local checkpoint (slowed down, counted)."""
    src = tiny_models.bert(tmp_path / "hub-src")
    calls: list[str] = []

    def transfer(repo_id: str, revision: str, tmp: Path) -> None:
        calls.append(repo_id)
        time.sleep(0.3)
        shutil.copytree(src, tmp, dirs_exist_ok=True)

    monkeypatch.setattr(download_module, "_fetch_hub", transfer)
    return calls


def test_replicas_sharing_a_volume_download_once(tmp_path: Path, fake_hub: list[str]) -> None:
    root = tmp_path / "volume"
    config = parse_config({"models": [hub_spec()], "model_root": str(root)})
    results: list[dict[str, str]] = []
    threads = [
        threading.Thread(target=lambda: results.append(fetch.fetch_all(config, root)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [{}] * 4 and fake_hub == ["org/tiny"]
    dest = root / "org" / "tiny" / SHA
    assert (dest / "model.safetensors").is_file()
    assert [p.name for p in dest.parent.iterdir()] == [SHA]  # no lock, no .tmp left
    assert fetch.fetch_state(root, config.models[0]) == {
        "dest": f"org/tiny/{SHA}",
        "state": "done",
        "error": "",
        "updated": pytest.approx(time.time(), abs=60),
    }


def test_a_stale_lock_and_its_leftovers_are_cleaned(tmp_path: Path, fake_hub: list[str]) -> None:
    root = tmp_path / "volume"
    dest = root / "org" / "tiny" / SHA
    lock = dest.with_name(f".lock-{SHA}")
    leftover = dest.with_name(f".tmp-{SHA}-crashed")
    lock.mkdir(parents=True)
    leftover.mkdir()
    old = time.time() - fetch.STALE_AFTER_S - 60
    os.utime(lock, (old, old))
    config = parse_config({"models": [hub_spec()], "model_root": str(root)})
    assert fetch.fetch_all(config, root) == {}
    assert sorted(p.name for p in dest.parent.iterdir()) == [SHA]


def test_a_held_lock_makes_others_wait(tmp_path: Path) -> None:
    dest = tmp_path / "org" / "m" / SHA
    order: list[str] = []
    with fetch.model_lock(dest):
        waiter = threading.Thread(
            target=lambda: (fetch.model_lock(dest).__enter__(), order.append("b"))
        )
        waiter.start()
        time.sleep(0.5)
        order.append("a")
    waiter.join(10)
    assert order == ["a", "b"]


def test_the_daemon_sees_a_download_in_progress_as_pending_then_loads_it(
    tmp_path: Path, fake_hub: list[str]
) -> None:
    root = tmp_path / "volume"
    config = parse_config({"models": [hub_spec()], "model_root": str(root)})
    dest = root / "org" / "tiny" / SHA
    fetch.write_progress(root, dest, "downloading")
    registry = ModelRegistry(config)
    registry.prepare()
    entry = registry.entry("tiny")
    assert entry.state is ModelState.PENDING and entry.failures == 0
    assert entry.error_class == "downloading"
    fetch.fetch_all(config, root)
    assert registry.get("tiny", timeout=60).spec.name == "tiny"
    registry.close()


def test_a_failed_download_is_the_models_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(repo_id: str, revision: str, tmp: Path) -> None:
        raise PermissionError("401 Client Error: gated repo")

    monkeypatch.setattr(download_module, "_fetch_hub", refused)
    root = tmp_path / "volume"
    config = parse_config({"models": [hub_spec()], "model_root": str(root)})
    failures = fetch.fetch_all(config, root)
    assert "gated repo" in failures["tiny"]
    registry = ModelRegistry(config)
    registry.prepare()
    entry = registry.entry("tiny")
    assert entry.state is ModelState.FAILED and entry.error_class == "download"
    assert "401" in entry.error
    with pytest.raises(ModelLoadError):
        registry.get("tiny", timeout=30)
    registry.close()
