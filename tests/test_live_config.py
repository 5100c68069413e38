"""A running daemon follows its configuration file (issue: a cache, not a restart).

Against a real ``modelcache serve`` process whose config file is updated the way the kubelet
updates a ConfigMap volume (a new directory, then a symlink swap): models are added,
removed and changed without a restart; unchanged models are not touched; a removal under
load answers every admitted request and NOT_FOUND afterwards; a change under load answers
each request entirely from the old or entirely from the new weights; a failed load is
retried on its own and a fixed checkpoint comes up; an invalid file changes nothing; the
HTTP probes say ready only when every configured model is.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fault_models
import grpc
import numpy as np
import pytest
import tiny_models
import yaml
from daemon_process import ServeProcess, rss_bytes
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelcache.client import ModelCacheClient, ModelCacheError, RetryPolicy
from modelcache.config import parse_config
from modelcache.daemon.changes import diff
from modelcache.examples import bundled_minilm
from modelcache.v1 import modelcache_pb2 as pb

pytestmark = pytest.mark.slow
READY, FAILED = pb.ModelStatus.READY, pb.ModelStatus.FAILED
TEXTS = ["the cache keeps its models", "while the set changes around them"]
ENV = {
    "MODELCACHE_CONFIG_POLL_S": "0.2",
    "MODELCACHE_RETRY_INITIAL_S": "0.5",
    "MODELCACHE_RETRY_MAX_S": "2",
}


def model(name: str, path: Path, task: str = "embedding", **kw: Any) -> dict[str, Any]:
    return {"name": name, "source": str(path), "task": task, "device": "cpu", **kw}


class ConfigVolume:
    """A config file as the kubelet keeps a ConfigMap volume: DIR/config.yaml ->
    ..data/config.yaml, ..data -> a timestamped directory, replaced by a symlink swap."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "config.yaml"
        self.version = 0
        root.mkdir(parents=True, exist_ok=True)

    def write(self, config: dict[str, Any] | str) -> None:
        self.version += 1
        data = config if isinstance(config, str) else yaml.safe_dump(config)
        stamp = self.root / f"..2026_{self.version:04d}"
        stamp.mkdir()
        (stamp / "config.yaml").write_text(data)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(stamp.name)
        os.replace(tmp, self.root / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to("..data/config.yaml")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("live-models")
    return {
        "minilm": bundled_minilm(),
        "bert-a": tiny_models.bert(root / "bert-a", seed=2),
        "bert-b": tiny_models.bert(root / "bert-b", seed=7),
        "gpt2": tiny_models.gpt2(root / "gpt2"),
    }


@pytest.fixture
def daemon(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> Iterator[tuple[ServeProcess, ConfigVolume]]:
    volume = ConfigVolume(tmp_path / "etc")
    first = {
        "models": [model("minilm", checkpoints["minilm"]), model("bert", checkpoints["bert-a"])]
    }
    proc = ServeProcess(first, tmp_path, env=ENV)
    proc.start()
    # From now on the daemon reads the kubelet-style volume: point its config path there.
    cfg = tmp_path / "daemon.yaml"
    volume.write(first)
    cfg.unlink()
    cfg.symlink_to(volume.path)
    proc.wait_settled()
    try:
        yield proc, volume
    finally:
        proc.stop()


def wait_for(what: str, probe: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def listing(proc: ServeProcess) -> dict[str, pb.ModelStatus]:
    return {m.name: m for m in proc.list_models().models}


def probe(proc: ServeProcess, path: str) -> tuple[int, dict[str, Any]]:
    url = proc.metrics_url().removesuffix("/metrics") + path
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def health(proc: ServeProcess, service: str) -> int:
    with grpc.insecure_channel(proc.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


# ----------------------------------------------------------------------------- unit
def test_diff_names_what_changed(checkpoints: dict[str, Path]) -> None:
    a, b = checkpoints["bert-a"], checkpoints["bert-b"]
    old = parse_config({"models": [model("x", a), model("y", a), model("z", a)]})
    new = parse_config(
        {
            "models": [model("x", a), model("y", b), model("w", a)],
            "batching": {"max_batch_size": 8},
            "log_level": "DEBUG",
        }
    )
    d = diff(old, new)
    assert [m.name for m in d.added] == ["w"] and d.removed == ("z",)
    assert [m.name for m in d.changed] == ["y"] and d.unchanged == ("x",)
    assert d.batching and d.log_level and not d.empty
    moved = diff(old, parse_config({**old.model_dump(), "model_root": str(a.parent)}))
    assert {m.name for m in moved.changed} == {"x", "y", "z"}, "model_root moves every source"
    assert diff(old, old).empty


# ----------------------------------------------------------------------------- serve
def test_add_and_remove_leave_the_other_models_alone(
    daemon: tuple[ServeProcess, ConfigVolume], checkpoints: dict[str, Path]
) -> None:
    proc, volume = daemon
    before = listing(proc)
    loads = proc.metric("modelcache_model_loads_total", model="minilm")
    volume.write(
        {
            "models": [
                model("minilm", checkpoints["minilm"]),
                model("bert", checkpoints["bert-a"]),
                model("gpt2", checkpoints["gpt2"], task="causal-lm"),
            ]
        }
    )
    wait_for("gpt2 ready", lambda: listing(proc).get("gpt2", pb.ModelStatus()).state == READY)
    after = listing(proc)
    for name in ("minilm", "bert"):  # untouched: same weights, no load
        assert after[name].fingerprint == before[name].fingerprint
    assert proc.metric("modelcache_model_loads_total", model="minilm") == loads
    assert health(proc, "gpt2") == health_pb2.HealthCheckResponse.SERVING
    with ModelCacheClient(proc.address) as c:
        assert c.logprobs("gpt2", ["added at run time"])[0].logprobs.size > 0

    rss = rss_bytes(proc.pid)
    weight = after["gpt2"].weight_bytes + after["bert"].weight_bytes
    volume.write({"models": [model("minilm", checkpoints["minilm"])]})
    wait_for("bert and gpt2 gone", lambda: set(listing(proc)) == {"minilm"})
    with ModelCacheClient(proc.address) as c, pytest.raises(ModelCacheError) as err:
        c.embed("bert", TEXTS)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert health(proc, "bert") == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    assert health(proc, "") == health_pb2.HealthCheckResponse.SERVING  # minilm is all there is
    wait_for(
        "their series to go",
        lambda: (
            proc.metric("modelcache_model_weight_bytes", model="bert") == 0
            and proc.metric("modelcache_model_loaded", model="gpt2") == 0
        ),
    )
    text = urllib.request.urlopen(proc.metrics_url(), timeout=5).read().decode()
    assert 'modelcache_model_weight_bytes{device="cpu",model="bert"}' not in text
    assert listing(proc)["minilm"].fingerprint == before["minilm"].fingerprint
    # the weights are given back (tiny models: the process shrinks by at least half of them)
    wait_for("memory to be released", lambda: rss_bytes(proc.pid) < rss - weight // 2, 30)


def test_a_removal_under_load_answers_every_admitted_request(
    daemon: tuple[ServeProcess, ConfigVolume], checkpoints: dict[str, Path]
) -> None:
    proc, volume = daemon
    codes: list[grpc.StatusCode] = []
    stop = threading.Event()

    def load() -> None:
        with ModelCacheClient(proc.address, retry=RetryPolicy(max_attempts=1)) as c:
            while not stop.is_set():
                try:
                    c.embed("bert", TEXTS)
                    codes.append(grpc.StatusCode.OK)
                except ModelCacheError as exc:
                    codes.append(exc.code)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for("answers", lambda: len(codes) > 20)
    volume.write({"models": [model("minilm", checkpoints["minilm"])]})
    wait_for("NOT_FOUND", lambda: grpc.StatusCode.NOT_FOUND in codes)
    stop.set()
    for t in threads:
        t.join(30)
    first = codes.index(grpc.StatusCode.NOT_FOUND)
    # Before the removal: answers; after: NOT_FOUND. A request caught between the two (it
    # passed the lookup as the model left) is refused UNAVAILABLE, which clients retry.
    assert set(codes[:first]) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, set(codes)
    assert set(codes) <= {
        grpc.StatusCode.OK,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAVAILABLE,
    }
    assert codes.count(grpc.StatusCode.UNAVAILABLE) <= 4  # at most one per client


def test_a_change_under_load_serves_old_then_new_never_a_mix(
    daemon: tuple[ServeProcess, ConfigVolume], checkpoints: dict[str, Path]
) -> None:
    proc, volume = daemon
    with ModelCacheClient(proc.address) as c:
        old = c.embed_result("bert", TEXTS)
    seen: list[tuple[str, np.ndarray]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        with ModelCacheClient(proc.address, retry=RetryPolicy(max_attempts=20)) as c:
            while not stop.is_set():
                try:
                    r = c.embed_result("bert", TEXTS)
                    seen.append((r.fingerprint, r.embeddings))
                except BaseException as exc:  # every failure is a finding
                    errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for("answers", lambda: len(seen) > 10)
    volume.write(
        {"models": [model("minilm", checkpoints["minilm"]), model("bert", checkpoints["bert-b"])]}
    )
    wait_for("the new weights", lambda: any(f != old.fingerprint for f, _ in seen[-3:]), 60)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    with ModelCacheClient(proc.address) as c:
        new = c.embed_result("bert", TEXTS)
    assert new.fingerprint != old.fingerprint
    for fingerprint, rows in seen:
        want = old if fingerprint == old.fingerprint else new
        assert fingerprint == want.fingerprint
        np.testing.assert_allclose(rows, want.embeddings, atol=1e-5)  # one model, whole
    switched = [f == new.fingerprint for f, _ in seen]
    assert switched[-1] and not switched[0]
    assert listing(proc)["bert"].pending_update == ""


def test_a_failed_load_is_retried_and_a_fixed_checkpoint_comes_up(
    daemon: tuple[ServeProcess, ConfigVolume], checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    proc, volume = daemon
    broken = fault_models.copy_model(checkpoints["bert-b"], tmp_path / "late")
    fault_models.truncate_weights(broken)
    volume.write(
        {
            "models": [
                model("minilm", checkpoints["minilm"]),
                model("bert", checkpoints["bert-a"]),
                model("late", broken),
            ]
        }
    )
    failed = wait_for(
        "a second failure",
        lambda: (m := listing(proc).get("late")) and m.load_failures >= 2 and m,
    )
    assert failed.state == FAILED and failed.error_class == "corrupt_weights"
    assert failed.next_retry_unix > time.time() - 1
    assert proc.metric("modelcache_model_loads_total", model="late", outcome="corrupt_weights") >= 2
    status, body = probe(proc, "/readyz")
    assert status == 503 and body["models"]["late"] is False and body["models"]["minilm"] is True
    assert probe(proc, "/livez")[0] == 200  # failing, not stuck
    shutil.copy(checkpoints["bert-b"] / "model.safetensors", broken / "model.safetensors")
    wait_for("the fixed model", lambda: listing(proc)["late"].state == READY, 30)
    assert listing(proc)["late"].load_failures == 0
    assert probe(proc, "/readyz")[0] == 200


def test_an_update_that_fails_keeps_the_old_weights_serving(
    daemon: tuple[ServeProcess, ConfigVolume], checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    proc, volume = daemon
    good = listing(proc)["bert"]
    missing = tmp_path / "nowhere"
    volume.write({"models": [model("minilm", checkpoints["minilm"]), model("bert", missing)]})
    m = wait_for("the failed update", lambda: (b := listing(proc)["bert"]).error and b)
    assert m.state == READY and m.fingerprint == good.fingerprint
    assert m.pending_update.startswith("source "), m.pending_update
    assert m.load_failures >= 1 and m.next_retry_unix > 0
    assert health(proc, "bert") == health_pb2.HealthCheckResponse.SERVING
    with ModelCacheClient(proc.address) as c:
        assert c.embed_result("bert", TEXTS).fingerprint == good.fingerprint


def test_an_invalid_file_changes_nothing_and_sighup_reloads(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    first = {"models": [model("minilm", checkpoints["minilm"])]}
    env = {**ENV, "MODELCACHE_CONFIG_POLL_S": "0"}  # only SIGHUP re-reads
    with ServeProcess(first, tmp_path, env=env) as proc:
        proc.wait_settled()
        cfg = tmp_path / "daemon.yaml"
        cfg.write_text("models: [{name: BAD NAME, source: x, task: nope}]\n")
        proc.proc.send_signal(1)  # type: ignore[union-attr]
        wait_for(
            "the invalid file counted",
            lambda: proc.metric("modelcache_config_reloads_total", result="invalid") == 1,
        )
        assert set(listing(proc)) == {"minilm"}
        assert "invalid configuration" in proc.log()
        both = {"models": [*first["models"], model("bert", checkpoints["bert-a"])]}
        cfg.write_text(yaml.safe_dump(both))
        time.sleep(1.0)
        assert set(listing(proc)) == {"minilm"}, "poll 0: nothing happens without SIGHUP"
        proc.proc.send_signal(1)  # type: ignore[union-attr]
        wait_for("bert", lambda: listing(proc).get("bert", pb.ModelStatus()).state == READY)
        assert proc.list_models().config_hash


def test_readyz_waits_for_every_model_and_livez_does_not(tmp_path: Path) -> None:
    big = fault_models.big_gpt2(tmp_path / "big", size_mb=150)
    cfg = {"models": [model("big", big, task="causal-lm")]}
    with ServeProcess(cfg, tmp_path) as proc:
        assert probe(proc, "/livez")[0] == 200
        statuses = []
        while proc.states().get("big") != READY:
            statuses.append(probe(proc, "/readyz")[0])
        assert 503 in statuses
        # READY in the registry comes a moment before its batch worker runs (readiness
        # needs both), so readiness follows within a moment, not at the same instant.
        wait_for(
            "readyz once the worker runs",
            lambda: probe(proc, "/readyz") == (200, {"ready": True, "models": {"big": True}}),
            timeout=30,
        )
        live = probe(proc, "/livez")[1]
        assert live["live"] is True and live["stalled"] == []
