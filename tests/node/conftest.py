"""Fixtures for tests on the real one-node cluster (hack/kube-node.sh): pods run.

Mark such tests ``@pytest.mark.node`` and use the package fixture ``node``. The binaries and
images are built once, after collection (outside any test's timeout); the node itself runs
only while tests/node runs and is taken down after it — checked to leave nothing behind — so
the timing-sensitive tests that follow have the machine to themselves. Set
MODELCACHE_NODE_SKIP=1 to skip these tests, MODELCACHE_NODE_KEEP_RUNNING=1 to leave a node
this run started running.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .cluster import Node, ensure_node, node_running, run_script
from .leftovers import leftovers

_build_error: BaseException | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    global _build_error
    if session.config.option.collectonly or os.environ.get("MODELCACHE_NODE_SKIP"):
        return
    if not any(item.get_closest_marker("node") for item in session.items):
        return
    try:
        run_script("build")
        run_script("images")
    except (subprocess.SubprocessError, OSError) as exc:
        _build_error = exc


@pytest.fixture(scope="package")
def node() -> Iterator[Node]:
    if os.environ.get("MODELCACHE_NODE_SKIP"):
        pytest.skip("MODELCACHE_NODE_SKIP is set")
    if _build_error is not None:
        raise RuntimeError("hack/kube-node.sh build/images failed") from _build_error
    was_running = node_running()
    forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    env = ensure_node()
    yield env
    if was_running or os.environ.get("MODELCACHE_NODE_KEEP_RUNNING"):
        return
    run_script("down", "--purge", timeout=600)
    left = leftovers(env.state_dir)
    assert not left, f"`hack/kube-node.sh down` left these behind: {left}"
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == forwarding


@pytest.fixture(scope="package")
def node_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory on this machine, mounted into daemon pods with hostPath."""
    from .models import write_models

    root = Path(tmp_path_factory.mktemp("node-models"))
    return write_models(root)
