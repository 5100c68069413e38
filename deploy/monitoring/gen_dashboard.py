"""Generate the modelcache Grafana dashboard (deploy/helm/modelcache/dashboards/modelcache.json).

    python deploy/monitoring/gen_dashboard.py           # rewrite the JSON
    python deploy/monitoring/gen_dashboard.py --check   # exit 1 if the JSON is out of date

Every query uses metric names from modelcache/metrics.py. tests/test_dashboard.py checks that
the JSON is what this script writes, type-checks it against @grafana/schema's ``Dashboard``
(and each panel's options against its plugin's ``Options``) with tsc, checks that every
metric a query names is exported by a live daemon or the operator, and
tests/test_prometheus_scrape.py runs every query on a real Prometheus scraping a daemon.

Series carry ``namespace`` and ``pod`` from Prometheus' Kubernetes discovery and
``modelcache`` (the ModelCache's name) from the chart's ServiceMonitor / PodMonitor
relabeling; the template variables filter on them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "helm" / "modelcache" / "dashboards" / "modelcache.json"

Json = dict[str, Any]

DS: Json = {"type": "prometheus", "uid": "${datasource}"}
# Daemon series of the selected ModelCaches, and of the selected models.
SEL = 'namespace=~"$namespace", modelcache=~"$modelcache"'
MSEL = SEL + ', model=~"$model"'
RATE = "$__rate_interval"


class Layout:
    """Places panels left to right on Grafana's 24-column grid, wrapping to new rows."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1
        self.panels: list[Json] = []

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        if self.x:
            self.y += self.row_h
        self.x, self.row_h = 0, 0
        self.panels.append({"type": "row", "id": self._id(), "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def add(self, panel: Json, w: int, h: int) -> None:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def target(expr: str, legend: str = "__auto", ref: str = "A", *, instant: bool = False,
           table: bool = False) -> Json:
    return {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend,
            "range": not instant, "instant": instant,
            "format": "table" if table else "time_series", "editorMode": "code"}


def thresholds(*steps: tuple[float | None, str]) -> Json:
    return {"mode": "absolute",
            "steps": [{"value": value, "color": color} for value, color in steps]}


LEGEND: Json = {"showLegend": True, "displayMode": "list", "placement": "bottom", "calcs": []}
LEGEND_TABLE: Json = {"showLegend": True, "displayMode": "table", "placement": "right",
                      "calcs": ["lastNotNull", "max"]}
TOOLTIP: Json = {"mode": "multi", "sort": "desc"}


def timeseries(title: str, description: str, targets: list[Json], unit: str, *,
               stack: bool = False, bars: bool = False, legend: Json = LEGEND,
               minimum: float | None = 0) -> Json:
    custom: Json = {"drawStyle": "bars" if bars else "line", "lineWidth": 1,
                    "fillOpacity": 60 if bars else 10, "showPoints": "never",
                    "spanNulls": False,
                    "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    defaults: Json = {"unit": unit, "custom": custom, "color": {"mode": "palette-classic"}}
    if minimum is not None:
        defaults["min"] = minimum
    return {"type": "timeseries", "title": title, "description": description, "datasource": DS,
            "targets": targets, "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": legend, "tooltip": TOOLTIP}}


def stat(title: str, description: str, targets: list[Json], unit: str, steps: Json, *,
         color_mode: str = "background", no_value: str = "0") -> Json:
    return {"type": "stat", "title": title, "description": description, "datasource": DS,
            "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": steps, "noValue": no_value,
                                         "color": {"mode": "thresholds"}},
                            "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                          "values": False},
                        "orientation": "auto", "colorMode": color_mode, "graphMode": "none",
                        "justifyMode": "auto", "textMode": "value_and_name",
                        "wideLayout": True, "showPercentChange": False,
                        "percentChangeColorMode": "standard"}}


def bargauge(title: str, description: str, targets: list[Json], unit: str) -> Json:
    return {"type": "bargauge", "title": title, "description": description, "datasource": DS,
            "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit, "min": 0,
                                         "color": {"mode": "continuous-BlPu"},
                                         "thresholds": thresholds((None, "blue"))},
                            "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                          "values": False},
                        "orientation": "horizontal", "displayMode": "gradient",
                        "valueMode": "color", "namePlacement": "auto", "showUnfilled": True,
                        "sizing": "auto", "minVizWidth": 8, "minVizHeight": 16,
                        "maxVizHeight": 300,
                        "legend": {"showLegend": False, "displayMode": "list",
                                   "placement": "bottom", "calcs": []}}}


def table(title: str, description: str, targets: list[Json], hide: list[str]) -> Json:
    return {"type": "table", "title": title, "description": description, "datasource": DS,
            "targets": targets,
            "fieldConfig": {"defaults": {"custom": {"align": "auto", "filterable": True}},
                            "overrides": []},
            "transformations": [{"id": "organize", "options": {
                "excludeByName": {name: True for name in hide}}}],
            "options": {"showHeader": True, "frameIndex": 0, "cellHeight": "sm"}}


def state_timeline(title: str, description: str, targets: list[Json]) -> Json:
    return {"type": "state-timeline", "title": title, "description": description,
            "datasource": DS, "targets": targets,
            "fieldConfig": {"defaults": {
                "color": {"mode": "thresholds"},
                "thresholds": thresholds((None, "red"), (1, "green")),
                "mappings": [{"type": "value", "options": {
                    "0": {"text": "not loaded", "color": "red", "index": 0},
                    "1": {"text": "loaded", "color": "green", "index": 1}}}],
                "custom": {"fillOpacity": 80, "lineWidth": 0}}, "overrides": []},
            "options": {"showValue": "auto", "rowHeight": 0.8, "mergeValues": True,
                        "alignValue": "left", "legend": LEGEND, "tooltip": TOOLTIP}}


def quantiles(metric: str, by: str, selector: str, legend: str) -> list[Json]:
    return [target(f"histogram_quantile({q}, sum by (le, {by}) "
                   f"(rate({metric}_bucket{{{selector}}}[{RATE}])))",
                   f"p{int(q * 100)} {legend}", ref)
            for q, ref in ((0.5, "A"), (0.99, "B"))]


def panels() -> list[Json]:
    g = Layout()

    g.row("Models: loading and state")
    g.add(state_timeline(
        "Model loaded, per pod",
        "modelcache_model_loaded: 1 once a model is loaded, verified (fingerprint, canary) "
        "and serving on that pod; 0 while loading or after a failed load.",
        [target(f"max by (namespace, modelcache, pod, model) (modelcache_model_loaded{{{MSEL}}})",
                "{{model}} @ {{pod}}")]), 12, 8)
    g.add(stat(
        "Meta-tensor errors by kind",
        "modelcache_meta_tensor_errors_total on live pods: parameters/buffers left on the meta "
        "device, or transformers/torch global state changed by a load (global_state). Any "
        "value above 0 means a load would have been silently wrong; alert "
        "ModelCacheMetaTensorError.",
        [target(f"sum by (kind) (modelcache_meta_tensor_errors_total{{{MSEL}}})", "{{kind}}")],
        "none", thresholds((None, "green"), (1, "red")), no_value="0 (none)"), 6, 8)
    g.add(bargauge(
        "Load attempts by outcome",
        "modelcache_model_loads_total on live pods, by outcome (success or the failure class).",
        [target(f"sum by (model, outcome) (modelcache_model_loads_total{{{MSEL}}})",
                "{{model}} {{outcome}}", instant=True)], "none"), 6, 8)
    g.add(timeseries(
        "Load seconds by stage (mean per load)",
        "Where load time goes: resolve (imports, config), read (safetensors into memory), "
        "materialize (build on device), verify (meta scan, fingerprint), warmup (canary "
        "forward). Mean of the loads each pod did, stacked.",
        [target(f"max by (model, stage) (modelcache_model_load_seconds_sum{{{MSEL}, "
                f'stage!="total"}} / modelcache_model_load_seconds_count{{{MSEL}, '
                f'stage!="total"}})', "{{model}} {{stage}}")],
        "s", stack=True, bars=True, legend=LEGEND_TABLE), 12, 8)
    g.add(timeseries(
        "Load seconds (total) by model",
        "modelcache_model_load_seconds{stage=\"total\"}: mean load time per pod, slowest pod "
        "per model. Alert ModelCacheSlowModelLoad fires above the chart's threshold.",
        [target(f"max by (model) (modelcache_model_load_seconds_sum{{{MSEL}, stage=\"total\"}} "
                f"/ modelcache_model_load_seconds_count{{{MSEL}, stage=\"total\"}})",
                "{{model}}")], "s"), 6, 8)
    g.add(bargauge(
        "Weight bytes per device",
        "modelcache_model_weight_bytes: bytes of parameters and buffers of each loaded model, "
        "by device (largest pod).",
        [target(f"max by (model, device) (modelcache_model_weight_bytes{{{MSEL}}})",
                "{{model}} on {{device}}", instant=True)], "bytes"), 6, 8)
    g.add(timeseries(
        "Device memory",
        "modelcache_device_memory_bytes: CUDA allocated / reserved / total, or the process "
        "RSS on cpu, per pod.",
        [target(f"max by (pod, device, kind) (modelcache_device_memory_bytes{{{SEL}}})",
                "{{pod}} {{device}} {{kind}}")], "bytes"), 24, 7)

    g.row("Serving")
    g.add(timeseries(
        "Requests by code",
        "modelcache_requests_total: RPCs answered per second, by model and gRPC status code.",
        [target(f"sum by (model, code) (rate(modelcache_requests_total{{{MSEL}}}[{RATE}]))",
                "{{model}} {{code}}")], "reqps", stack=True), 12, 8)
    g.add(timeseries(
        "Errors by code",
        "Requests answered with a status other than OK. RESOURCE_EXHAUSTED: queue full "
        "(alert ModelCacheResourceExhausted); UNAVAILABLE: model not loaded.",
        [target(f"sum by (model, code) (rate(modelcache_requests_total{{{MSEL}, "
                f'code!="OK"}}[{RATE}]))', "{{model}} {{code}}")], "reqps", stack=True),
        12, 8)
    g.add(timeseries(
        "Latency p50 / p99: queue vs compute",
        "modelcache_request_duration_seconds by phase: queue (admission to batch start) and "
        "compute (the batch's forward pass).",
        quantiles("modelcache_request_duration_seconds", "phase",
                  f'{MSEL}, phase=~"queue|compute"', "{{phase}}"), "s"), 12, 8)
    g.add(timeseries(
        "Queue depth",
        "modelcache_queue_depth: sequences admitted and waiting for a forward pass, per pod.",
        [target(f"sum by (model, pod) (modelcache_queue_depth{{{MSEL}}})", "{{model}} @ {{pod}}")],
        "none"), 12, 8)
    g.add(timeseries(
        "Batch size (sequences per forward)",
        "modelcache_batch_size: how well the dynamic batcher fills batches.",
        quantiles("modelcache_batch_size", "model", MSEL, "{{model}}"), "none"), 8, 8)
    g.add(timeseries(
        "Batch tokens (padded)",
        "modelcache_batch_tokens: rows x longest sequence per forward pass "
        "(batching.max_batch_tokens caps it).",
        quantiles("modelcache_batch_tokens", "model", MSEL, "{{model}}"), "none"), 8, 8)
    g.add(timeseries(
        "Tokens per second",
        "modelcache_tokens_total: input tokens processed (unpadded), by model and method.",
        [target(f"sum by (model, method) (rate(modelcache_tokens_total{{{MSEL}}}[{RATE}]))",
                "{{model}} {{method}}")], "none", stack=True), 8, 8)
    g.add(timeseries(
        "Out of memory and device failures",
        "modelcache_batch_oom_total per second: batches split after a device out-of-memory "
        "(split) and sequences that did not fit alone (too_large, answered "
        "RESOURCE_EXHAUSTED); lower batching.max_batch_tokens if splits persist. "
        "modelcache_device_failures_total: context-poisoning device errors, after which the "
        "daemon exits and the kubelet restarts it (alert ModelCacheDeviceLost).",
        [target(f"sum by (model, outcome) (rate(modelcache_batch_oom_total{{{MSEL}}}[{RATE}]))",
                "{{model}} oom {{outcome}}"),
         target(f"sum by (model) (rate(modelcache_device_failures_total{{{MSEL}}}[{RATE}]))",
                "{{model}} device lost")], "ops", stack=True), 24, 8)

    g.row("Versions and operator")
    g.add(table(
        "Build info (version skew across pods)",
        "modelcache_build_info per pod: modelcache, torch, transformers, Python and CUDA "
        "versions. More than one distinct row per ModelCache is version skew "
        "(alert ModelCacheVersionSkew).",
        [target(f"max by (namespace, modelcache, pod, version, torch, transformers, python, "
                f"cuda) (modelcache_build_info{{{SEL}}})", "", instant=True, table=True)],
        ["Time", "Value"]), 16, 8)
    g.add(stat(
        "Distinct daemon builds",
        "Number of distinct (modelcache, torch, transformers, python, cuda) version sets among "
        "the selected pods: 1 is healthy.",
        [target("count(count by (version, torch, transformers, python, cuda) "
                f"(modelcache_build_info{{{SEL}}}))", "builds")],
        "none", thresholds((None, "green"), (2, "orange")), no_value="no daemon"), 4, 8)
    g.add(stat(
        "Worker restarts",
        "modelcache_worker_restarts_total on live pods: batch worker threads that died and "
        "were restarted.",
        [target(f"sum(modelcache_worker_restarts_total{{{MSEL}}})", "restarts")],
        "none", thresholds((None, "green"), (1, "orange"))), 4, 8)
    g.add(timeseries(
        "ModelCaches by phase",
        "modelcache_operator_modelcaches: ModelCache resources the operator sees, by phase "
        "(namespace is the ModelCache's).",
        [target('sum by (phase) (modelcache_operator_modelcaches{namespace=~"$namespace"})',
                "{{phase}}")], "none", stack=True), 8, 8)
    g.add(timeseries(
        "Operator reconciles by result",
        "modelcache_operator_reconcile_total per second, by handler and result (success, "
        "retry, permanent_error; busy = a status tick skipped while a handler converged the "
        "same ModelCache).",
        [target(f"sum by (handler, result) (rate(modelcache_operator_reconcile_total[{RATE}]))",
                "{{handler}} {{result}}")], "ops", stack=True), 8, 8)
    g.add(timeseries(
        "Operator reconcile duration p50 / p99",
        "modelcache_operator_reconcile_duration_seconds by handler.",
        quantiles("modelcache_operator_reconcile_duration_seconds", "handler", "",
                  "{{handler}}"), "s"), 8, 8)
    g.add(table(
        "Operator build info",
        "modelcache_operator_build_info per operator pod.",
        [target("max by (pod, version, kopf, python) (modelcache_operator_build_info)", "",
                instant=True, table=True)], ["Time", "Value"]), 24, 5)
    return g.panels


def variable(name: str, label: str, query: str) -> Json:
    return {"name": name, "label": label, "type": "query", "datasource": DS, "query": query,
            "refresh": 2, "sort": 1, "multi": True, "includeAll": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "options": [], "hide": 0, "regex": ""}


def dashboard() -> Json:
    return {
        "uid": "modelcache",
        "title": "modelcache",
        "description": "Model loading (stages, outcomes, meta-tensor errors), serving (rates, "
                       "errors, latency, batching, queues), versions and the operator.",
        "tags": ["modelcache", "ml", "inference"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 41,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "refresh": 1, "hide": 0, "includeAll": False,
             "multi": False, "regex": "", "options": [],
             "current": {"selected": False, "text": "default", "value": "default"}},
            variable("namespace", "Namespace", "label_values(modelcache_build_info, namespace)"),
            variable("modelcache", "ModelCache",
                     'label_values(modelcache_build_info{namespace=~"$namespace"}, modelcache)'),
            variable("model", "Model",
                     f"label_values(modelcache_model_loaded{{{SEL}}}, model)"),
        ]},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--check", action="store_true", help="fail if the JSON is out of date")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run python {Path(__file__).name}",
                  file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
