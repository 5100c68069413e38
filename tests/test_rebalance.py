"""Replicas added later get traffic from clients that are already running.

A round-robin gRPC client resolves its target when it connects and again when a connection
goes away; a daemon that closes every connection after ``max_connection_age`` (GOAWAY, with
a grace for the calls on it) makes running clients re-resolve, so they find replicas added
since. Here with real DNS: dnsmasq (Debian) on 127.0.0.1 answers ``replicas.test`` with one
daemon's address, then with two (127.0.0.1 and 127.0.0.2: loopback is a /8), as a headless
Service's DNS does when a replica comes up; the client keeps running and the new daemon's
request counter must move.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_process import ServeProcess

from modelcache.client import ModelCacheClient, RetryPolicy
from modelcache.examples import bundled_minilm

pytestmark = pytest.mark.slow
AGE = {"MODELCACHE_MAX_CONNECTION_AGE_S": "2", "MODELCACHE_MAX_CONNECTION_AGE_GRACE_S": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[tuple[int, Path, subprocess.Popen[bytes]]]:
    binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    if not Path(binary).exists():
        pytest.fail("dnsmasq missing: run `bash hack/system-deps.sh` (make test does)")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 replicas.test\n")
    port = _free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            f"--addn-hosts={hosts}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            f"--port={port}",
            "--local-ttl=1",
            "--conf-file=/dev/null",
            "--pid-file=",
            "--user=root",
            f"--log-facility={tmp_path / 'dnsmasq.log'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    time.sleep(0.5)
    assert proc.poll() is None, (tmp_path / "dnsmasq.log").read_text(errors="replace")
    try:
        yield port, hosts, proc
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_running_client_reaches_a_replica_added_later(
    dns: tuple[int, Path, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    dns_port, hosts, dnsmasq = dns
    config = {"models": [{"name": "minilm", "source": str(bundled_minilm()), "task": "embedding"}]}
    port = _free_port()
    first = ServeProcess(config, tmp_path / "a", port=port, env=AGE, name="a")
    second = ServeProcess(config, tmp_path / "b", port=port, env=AGE, name="b", host="127.0.0.2")
    with first, second:
        first.wait_settled()
        second.wait_settled()
        stop = threading.Event()
        errors: list[BaseException] = []

        def load() -> None:
            target = f"dns://127.0.0.1:{dns_port}/replicas.test:{port}"
            with ModelCacheClient(target, retry=RetryPolicy(max_attempts=10)) as client:
                while not stop.is_set():
                    try:
                        client.embed("minilm", ["who answers?"])
                    except BaseException as exc:  # every failure is a finding
                        errors.append(exc)
                    time.sleep(0.02)

        thread = threading.Thread(target=load)
        thread.start()
        try:
            time.sleep(3)
            served = "modelcache_requests_total"
            assert first.metric(served, method="Embed", code="OK") > 0
            assert second.metric(served, method="Embed", code="OK") == 0  # not in DNS yet
            hosts.write_text("127.0.0.1 replicas.test\n127.0.0.2 replicas.test\n")
            dnsmasq.send_signal(signal.SIGHUP)  # re-reads its hosts file
            deadline = time.monotonic() + 30
            while second.metric(served, method="Embed", code="OK") == 0:
                assert time.monotonic() < deadline, "the added replica got no request"
                time.sleep(0.5)
        finally:
            stop.set()
            thread.join(30)
        assert not errors, errors[:3]
        assert first.metric(served, method="Embed", code="OK") > 0
