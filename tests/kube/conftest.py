"""Fixtures for tests that need a real (local, 127.0.0.1-only) Kubernetes control plane.

Mark such tests ``@pytest.mark.kube`` and use the session fixture ``kube_env``.
Set MODELCACHE_KUBE_SKIP=1 to skip them instead of building/starting the control plane.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from .cluster import (
    PROCESS_LOGS,
    KubeEnv,
    control_plane_running,
    ensure_control_plane,
    run_script,
    stop_control_plane,
)

_build_error: BaseException | None = None
_TAIL_LINES = 60
_own_state_dir = False  # True when this run made its state dir (CI): removed at the end


def pytest_configure(config: pytest.Config) -> None:
    # In CI every run gets a control plane of its own, in a fresh state dir: nothing another
    # run left behind in a shared /tmp (pid files, etcd data, a live process in another pid
    # namespace) can be taken for ours. Locally the per-checkout default is reused.
    global _own_state_dir
    if os.environ.get("CI") and not os.environ.get("MODELCACHE_KUBE_STATE"):
        os.environ["MODELCACHE_KUBE_STATE"] = tempfile.mkdtemp(prefix="modelcache-kube-ci-")
        _own_state_dir = True


def pytest_collection_finish(session: pytest.Session) -> None:
    # The first build takes ~6 minutes: do it here, outside the per-test timeout that
    # would otherwise also cover the setup of the session fixture.
    global _build_error
    if session.config.option.collectonly or os.environ.get("MODELCACHE_KUBE_SKIP"):
        return
    if not any(item.get_closest_marker("kube") for item in session.items):
        return
    try:
        run_script("build")
    except (subprocess.SubprocessError, OSError) as exc:
        _build_error = exc


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report: pytest.TestReport = yield
    # Teardown too: the fixture's checks (no 403 in any operator log) fail there.
    if report.failed and report.when in ("call", "teardown"):
        for log in item.stash.get(PROCESS_LOGS, []):
            if log.exists():
                lines = log.read_text(errors="replace").splitlines()
                tail = [line for line in lines if "Timer 'refresh' succeeded" not in line]
                tail = tail[-_TAIL_LINES:]
                report.sections.append((f"last {_TAIL_LINES} lines of {log.name}", "\n".join(tail)))
    return report


@pytest.fixture(scope="session")
def kube_env() -> Iterator[KubeEnv]:
    if os.environ.get("MODELCACHE_KUBE_SKIP"):
        pytest.skip("MODELCACHE_KUBE_SKIP is set")
    if _build_error is not None:
        raise RuntimeError("hack/kube-control-plane.sh build failed") from _build_error
    was_running = control_plane_running()
    env = ensure_control_plane()
    yield env
    # Leave a control plane that someone else started running; stop the one we started.
    if not was_running and not os.environ.get("MODELCACHE_KUBE_KEEP_RUNNING"):
        if _own_state_dir:
            run_script("reset", timeout=120)
        else:
            stop_control_plane()
