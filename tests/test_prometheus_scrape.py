"""A real Prometheus server (Debian's, on 127.0.0.1) scrapes a real daemon serving the bundled
MiniLM, with the chart's alerting rules loaded:

* the loaded model's ``modelcache_model_load_seconds`` series come back through the HTTP API;
* the daemon's exposition passes ``promtool check metrics``;
* every dashboard query runs on the server, and returns data wherever the daemon has
  samples for what it reads (after a few Embed calls, two of them errors);
* every alerting rule evaluates without error, and none fires on a healthy daemon.

Targets get the labels the chart's PodMonitor gives (namespace, pod, modelcache).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import yaml
from monitoring.tools import (
    Daemon,
    dashboard,
    dashboard_targets,
    free_port,
    grafana_to_promql,
    http_get,
    promql_metric_names,
    rendered_rules,
    run,
    running_daemon,
    stop,
    tool,
    variable_selector,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

from modelcache.v1 import modelcache_pb2, modelcache_pb2_grpc

TARGET_LABELS = {"namespace": "ml", "modelcache": "minilm-cache", "pod": "minilm-cache-0"}
VARIABLES = {"namespace": "ml", "modelcache": "minilm-cache", "model": "minilm"}
# Dashboard queries that stay empty on a healthy daemon with no operator in sight.
EMPTY_WHEN_HEALTHY = (
    "modelcache_meta_tensor_errors_total",
    "modelcache_worker_restarts_total",
    "modelcache_batch_oom_total",
    "modelcache_device_failures_total",
    "modelcache_operator_",
)


class Prometheus:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        body = json.loads(http_get(f"{self.url}/api/v1/{path}?{query}", timeout=10))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else []
        return result


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("daemon")) as d:
        yield d


@pytest.fixture(scope="module")
def prometheus(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    tmp = tmp_path_factory.mktemp("prometheus")
    rules = rendered_rules()
    (tmp / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(tmp / "rules.yaml")],
        "scrape_configs": [
            {
                "job_name": "ml/minilm-cache",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{daemon.metrics_port}"], "labels": TARGET_LABELS}
                ],
            }
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    run([tool("promtool"), "check", "config", str(tmp / "prometheus.yml")])
    port = free_port()
    log = tmp / "prometheus.log"
    with log.open("wb") as logf:
        proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    prom = Prometheus(port)
    try:
        wait_for(lambda: http_get(f"{prom.url}/-/ready").strip(), 60, "Prometheus ready", proc, log)
        wait_for(
            lambda: prom.query('up{job="ml/minilm-cache"} == 1'),
            30,
            "the daemon target to be up",
            proc,
            log,
        )
        yield prom
    finally:
        stop(proc)


def _embed(daemon: Daemon) -> None:
    with grpc.insecure_channel(
        f"127.0.0.1:{daemon.grpc_port}", options=[("grpc.enable_http_proxy", 0)]
    ) as ch:
        stub = modelcache_pb2_grpc.ModelCacheStub(ch)
        for i in range(4):
            r = stub.Embed(
                modelcache_pb2.EmbedRequest(
                    model="minilm", inputs=[f"sentence {i}", "another one"], truncate=True
                ),
                timeout=60,
            )
            assert r.rows == 2 and r.dims == 384
        with pytest.raises(grpc.RpcError) as err:
            stub.Embed(modelcache_pb2.EmbedRequest(model="no-such-model", inputs=["x"]), timeout=60)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:  # longer than max_length, no truncation
            stub.Embed(
                modelcache_pb2.EmbedRequest(
                    model="minilm", inputs=["word " * 2000], truncate=False
                ),
                timeout=60,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_prometheus_scrapes_load_seconds_of_the_loaded_model(prometheus: Prometheus) -> None:
    series = prometheus.query('modelcache_model_load_seconds_count{model="minilm"}')
    stages = {s["metric"]["stage"]: float(s["value"][1]) for s in series}
    assert set(stages) == {"resolve", "read", "materialize", "verify", "warmup", "total"}
    assert all(v == 1.0 for v in stages.values()), stages
    total = prometheus.query('modelcache_model_load_seconds_sum{model="minilm", stage="total"}')
    assert len(total) == 1 and float(total[0]["value"][1]) > 0
    labels = total[0]["metric"]
    assert {k: labels[k] for k in TARGET_LABELS} == TARGET_LABELS
    assert prometheus.query('modelcache_model_loaded{model="minilm"} == 1')


def test_daemon_exposition_passes_promtool(daemon: Daemon) -> None:
    _embed(daemon)  # serving metrics have samples too
    text = daemon.metrics()
    run([tool("promtool"), "check", "metrics"], input=text)
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {
        "modelcache_requests",
        "modelcache_request_duration_seconds",
        "modelcache_model_load_seconds",
        "modelcache_build_info",
    } <= families


def test_every_dashboard_query_runs_on_prometheus(daemon: Daemon, prometheus: Prometheus) -> None:
    _embed(daemon)
    dash = dashboard()
    exprs = [(title, grafana_to_promql(e, VARIABLES)) for title, e in dashboard_targets(dash)]
    # The template variables' queries find the daemon's namespace, ModelCache and model.
    exprs += [
        (f"variable {v['name']}", grafana_to_promql(variable_selector(v["query"]), VARIABLES))
        for v in dash["templating"]["list"]
        if v["type"] == "query"
    ]
    pending = {
        (t, e)
        for t, e in exprs
        if not any(m.startswith(EMPTY_WHEN_HEALTHY) for m in promql_metric_names(e))
    }
    deadline = time.monotonic() + 30
    while True:  # rate() needs two scrapes after the calls
        for title, expr in exprs:
            result = prometheus.query(expr)  # raises on a query error
            if result:
                pending.discard((title, expr))
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not pending, f"dashboard queries with no data from a serving daemon: {pending}"


def test_alert_rules_evaluate_and_stay_quiet_on_a_healthy_daemon(prometheus: Prometheus) -> None:
    names = {r["alert"] for g in rendered_rules()["groups"] for r in g["rules"]}

    def evaluated() -> list[dict[str, Any]]:
        groups = prometheus.api("rules", type="alert")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        done = [
            r
            for r in rules
            if r.get("lastEvaluation", "").startswith("20")
            and not r["lastEvaluation"].startswith("0001")
        ]
        return rules if len(done) == len(names) else []

    rules = wait_for(evaluated, 30, "every alerting rule to be evaluated")
    assert {r["name"] for r in rules} == names
    for r in rules:
        assert r["health"] == "ok", (r["name"], r.get("lastError"))
    # Nothing fires on a daemon that loaded its model and serves; only the operator's
    # absence is noticed (pending: no operator is scraped here).
    active = {r["name"]: r["state"] for r in rules if r["state"] != "inactive"}
    assert active == {"ModelCacheOperatorAbsent": "pending"}, active
