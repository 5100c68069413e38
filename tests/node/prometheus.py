"""A real Prometheus (Debian's) on this machine scraping the node's pods, with scrape jobs
translated from the chart's PodMonitors and ServiceMonitors the way prometheus-operator
translates them: the selector's labels and the endpoint's port name become `keep`
relabelings over Kubernetes discovery labels; namespace/pod/container target labels; the
monitor's own relabelings last. So a selector or port name in the chart that matches nothing
on real pods leaves a job with no target, and the test fails.

Debian builds Prometheus without kubernetes_sd_configs, so discovery is done here: the pods
and Endpoints read from the API server become file_sd targets carrying the same
``__meta_kubernetes_*`` labels kubernetes_sd would give them (role pod: one target per
container port; role endpoints: one per address and port, with the Service's and the pod's
labels). Intervals are cut to 1 s for the test; everything else comes from the monitors.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from monitoring.tools import free_port, http_get, run, stop, tool, wait_for

from .cluster import Node


def _sanitize(label: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _object_labels(prefix: str, labels: dict[str, str]) -> dict[str, str]:
    out = {}
    for key, value in labels.items():
        out[f"__meta_kubernetes_{prefix}_label_{_sanitize(key)}"] = value
        out[f"__meta_kubernetes_{prefix}_labelpresent_{_sanitize(key)}"] = "true"
    return out


def pod_targets(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """kubernetes_sd role pod: one target per declared container port of a pod with an IP."""
    out = []
    for pod in pods:
        ip = pod["status"].get("podIP")
        if not ip:
            continue
        meta = pod["metadata"]
        base = {
            "__meta_kubernetes_namespace": meta["namespace"],
            "__meta_kubernetes_pod_name": meta["name"],
            "__meta_kubernetes_pod_ip": ip,
            **_object_labels("pod", meta.get("labels") or {}),
        }
        for c in pod["spec"]["containers"]:
            for port in c.get("ports") or []:
                labels = {
                    **base,
                    "__meta_kubernetes_pod_container_name": c["name"],
                    "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                    "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                }
                out.append({"targets": [f"{ip}:{port['containerPort']}"], "labels": labels})
    return out


def endpoint_targets(
    services: list[dict[str, Any]], endpoints: list[dict[str, Any]], pods: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """kubernetes_sd role endpoints: one target per ready address and port of each Endpoints
    object, with its Service's labels and, where the address is a pod, the pod's."""
    svc = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in services}
    by_pod = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in pods}
    out = []
    for ep in endpoints:
        ns, name = ep["metadata"]["namespace"], ep["metadata"]["name"]
        service = svc.get((ns, name))
        if service is None:
            continue
        for subset in ep.get("subsets") or []:
            for address in subset.get("addresses") or []:
                ref = address.get("targetRef") or {}
                pod = by_pod.get((ns, ref.get("name", ""))) if ref.get("kind") == "Pod" else None
                for port in subset.get("ports") or []:
                    labels = {
                        "__meta_kubernetes_namespace": ns,
                        "__meta_kubernetes_service_name": name,
                        "__meta_kubernetes_endpoints_name": name,
                        "__meta_kubernetes_endpoint_port_name": port.get("name", ""),
                        "__meta_kubernetes_endpoint_ready": "true",
                        **_object_labels("service", service["metadata"].get("labels") or {}),
                    }
                    if pod is not None:
                        labels["__meta_kubernetes_pod_name"] = pod["metadata"]["name"]
                        labels.update(_object_labels("pod", pod["metadata"].get("labels") or {}))
                        for c in pod["spec"]["containers"]:
                            if any(
                                p.get("containerPort") == port["port"] for p in c.get("ports") or []
                            ):
                                labels["__meta_kubernetes_pod_container_name"] = c["name"]
                    out.append({"targets": [f"{address['ip']}:{port['port']}"], "labels": labels})
    return out


def _relabelings(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """prometheus-operator's camelCase relabelings -> Prometheus's snake_case."""
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return [{keys.get(k, k): v for k, v in r.items()} for r in items]


def scrape_config(monitor: dict[str, Any], targets_dir: Path) -> dict[str, Any]:
    kind, meta, spec = monitor["kind"], monitor["metadata"], monitor["spec"]
    pod_monitor = kind == "PodMonitor"
    (endpoint,) = spec["podMetricsEndpoints" if pod_monitor else "endpoints"]
    obj = "pod" if pod_monitor else "service"
    relabel: list[dict[str, Any]] = []
    ns_selector = spec.get("namespaceSelector") or {}
    if not ns_selector.get("any"):
        names = ns_selector.get("matchNames") or [meta["namespace"]]
        relabel.append(
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_namespace"],
                "regex": "|".join(re.escape(n) for n in names),
            }
        )
    for key, value in spec["selector"]["matchLabels"].items():
        relabel.append(
            {
                "action": "keep",
                "source_labels": [
                    f"__meta_kubernetes_{obj}_label_{_sanitize(key)}",
                    f"__meta_kubernetes_{obj}_labelpresent_{_sanitize(key)}",
                ],
                "regex": f"({re.escape(value)});true",
            }
        )
    port_label = (
        "__meta_kubernetes_pod_container_port_name"
        if pod_monitor
        else "__meta_kubernetes_endpoint_port_name"
    )
    relabel.append({"action": "keep", "source_labels": [port_label], "regex": endpoint["port"]})
    for source, target in (
        ("__meta_kubernetes_namespace", "namespace"),
        ("__meta_kubernetes_pod_name", "pod"),
        ("__meta_kubernetes_pod_container_name", "container"),
    ):
        relabel.append({"source_labels": [source], "target_label": target})
    relabel += _relabelings(endpoint.get("relabelings") or [])
    role = "pods" if pod_monitor else "endpoints"
    return {
        "job_name": f"{kind.lower()}/{meta['namespace']}/{meta['name']}",
        "honor_labels": bool(endpoint.get("honorLabels", False)),
        "metrics_path": endpoint.get("path", "/metrics"),
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "file_sd_configs": [
            {"files": [str(targets_dir / f"{role}.json")], "refresh_interval": "1s"}
        ],
        "relabel_configs": relabel,
    }


def write_targets(node: Node, targets_dir: Path) -> None:
    """Discovery: every pod and Endpoints object of the cluster, as file_sd targets."""
    pods = node.items("pods", "--all-namespaces")
    services = node.items("services", "--all-namespaces")
    endpoints = node.items("endpoints", "--all-namespaces")
    for role, targets in (
        ("pods", pod_targets(pods)),
        ("endpoints", endpoint_targets(services, endpoints, pods)),
    ):
        tmp = targets_dir / f"{role}.json.tmp"
        tmp.write_text(json.dumps(targets))
        tmp.replace(targets_dir / f"{role}.json")


class Prometheus:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"query": expr})
        body = json.loads(http_get(f"{self.url}/api/v1/query?{q}", timeout=10))
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


@contextmanager
def running_prometheus(
    node: Node, monitors: list[dict[str, Any]], tmp: Path
) -> Iterator[Prometheus]:
    write_targets(node, tmp)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [scrape_config(m, tmp) for m in monitors],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
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
            env=node.environ(),
        )
    prom = Prometheus(port)
    try:
        wait_for(lambda: http_get(f"{prom.url}/-/ready").strip(), 60, "Prometheus ready", proc, log)
        yield prom
    finally:
        stop(proc)
