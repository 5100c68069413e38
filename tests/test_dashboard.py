"""The Grafana dashboard (deploy/helm/modelcache/dashboards/modelcache.json):

* it is what deploy/monitoring/gen_dashboard.py writes, and what the chart's ConfigMap holds;
* it type-checks with a real tsc against @grafana/schema's ``Dashboard`` (and each panel's
  options against its plugin's ``Options``), in their JSON form: string enums as their
  values, exactly as Grafana stores them;
* every query parses (promtool's PromQL parser) and every metric it names is in the
  exposition of a live daemon (``modelcache serve`` on the bundled MiniLM) or the operator;
* it has the panels and template variables the issue asks for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from monitoring.tools import (
    GRAFANA_DIR,
    REPO,
    dashboard,
    dashboard_targets,
    exposition_names,
    find,
    grafana_to_promql,
    promql_metric_names,
    render,
    run,
    running_daemon,
    tool,
    variable_selector,
)
from prometheus_client import generate_latest

from modelcache.metrics import OPERATOR_REGISTRY

GENERATOR = REPO / "deploy" / "monitoring" / "gen_dashboard.py"
SCHEMA = GRAFANA_DIR / "node_modules" / "@grafana" / "schema" / "dist" / "types"
# Panel plugin -> its panelcfg module in @grafana/schema, and whether it has a FieldConfig.
PLUGINS = {
    "timeseries": ("timeseries", True),
    "stat": ("stat", False),
    "bargauge": ("bargauge", False),
    "table": ("table", True),
    "state-timeline": ("statetimeline", True),
}

TS_PRELUDE = """\
import type {{ Dashboard }} from "@grafana/schema";
{imports}

// The JSON form of a TypeScript type: string enums become the union of their values (what a
// dashboard JSON file holds), everything else keeps its shape, optionality and strictness.
type Json<T> =
  T extends string ? `${{T}}` :
  T extends number | boolean | null | undefined ? T :
  T extends readonly (infer U)[] ? Json<U>[] :
  T extends object ? {{ [K in keyof T]: Json<T[K]> }} :
  T;
type DeepPartial<T> = T extends readonly (infer U)[] ? DeepPartial<U>[] :
  T extends object ? {{ [K in keyof T]?: DeepPartial<T[K]> }} : T;

export const dashboard: Json<Dashboard> = {body};
"""


def _emit(value: Any, path: tuple[Any, ...], wrap: dict[tuple[Any, ...], str]) -> str:
    if isinstance(value, dict):
        inner = ", ".join(
            f"{json.dumps(k)}: {_emit(v, (*path, k), wrap)}" for k, v in value.items()
        )
        text = "{" + inner + "}"
    elif isinstance(value, list):
        text = "[" + ", ".join(_emit(v, (*path, i), wrap) for i, v in enumerate(value)) + "]"
    else:
        text = json.dumps(value)
    if path in wrap:
        return f"({text} satisfies {wrap[path]})"
    return text


def dashboard_ts(dash: dict[str, Any]) -> str:
    imports, wrap = [], {}
    for plugin, (module, has_field_config) in PLUGINS.items():
        alias = module.capitalize()
        names = [f"Options as {alias}Options"]
        if has_field_config:
            names.append(f"FieldConfig as {alias}FieldConfig")
        target = SCHEMA / "raw" / "composable" / module / "panelcfg" / "x" / "types.gen"
        imports.append(f"import type {{ {', '.join(names)} }} from {json.dumps(str(target))};")
        for i, panel in enumerate(dash["panels"]):
            if panel["type"] != plugin:
                continue
            wrap[("panels", i, "options")] = f"Json<{alias}Options>"
            if has_field_config:
                wrap[("panels", i, "fieldConfig", "defaults", "custom")] = (
                    f"DeepPartial<Json<{alias}FieldConfig>>"
                )
    unknown = {p["type"] for p in dash["panels"]} - set(PLUGINS) - {"row"}
    assert not unknown, f"add the panel types {unknown} to PLUGINS"
    return TS_PRELUDE.format(imports="\n".join(imports), body=_emit(dash, (), wrap))


def typecheck(source: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    (tmp / "dashboard.ts").write_text(source)
    (tmp / "tsconfig.json").write_text(
        json.dumps(
            {
                "compilerOptions": {
                    "strict": True,
                    "noEmit": True,
                    "target": "es2022",
                    "module": "esnext",
                    "moduleResolution": "bundler",
                    "skipLibCheck": True,
                    "types": [],
                    "paths": {"@grafana/schema": [str(SCHEMA / "index.d.ts")]},
                },
                "files": ["dashboard.ts"],
            }
        )
    )
    return run([tool("tsc"), "-p", str(tmp / "tsconfig.json")], check=False, timeout=120)


def test_dashboard_json_is_generated() -> None:
    proc = run([sys.executable, str(GENERATOR), "--check"], check=False)
    assert proc.returncode == 0, proc.stderr


def test_chart_configmap_holds_the_dashboard() -> None:
    docs = render(
        "--show-only",
        "templates/dashboard.yaml",
        values={
            "monitoring": {"dashboard": {"enabled": True, "annotations": {"grafana_folder": "ML"}}}
        },
    )
    cm = find(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "ML"}
    assert json.loads(cm["data"]["modelcache.json"]) == dashboard()


def test_dashboard_typechecks_against_grafana_schema(tmp_path: Path) -> None:
    proc = typecheck(dashboard_ts(dashboard()), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_typecheck_rejects_a_broken_dashboard(tmp_path: Path) -> None:
    """The check has teeth: a wrong type, an unknown key, an invalid enum value in a field
    config and an invalid panel option each fail, with tsc naming the problem."""
    for breakage, message in (
        ("schema_version", "'string' is not assignable to type 'number'"),
        ("panel_key", "'\"gridpos\"' does not exist"),
        ("enum", "'\"absolut\"' is not assignable"),
        ("option", "'\"top\"' is not assignable to type 'LegendPlacement'"),
    ):
        dash = dashboard()
        if breakage == "schema_version":
            dash["schemaVersion"] = "41"
        elif breakage == "panel_key":
            dash["panels"][1]["gridpos"] = dash["panels"][1].pop("gridPos")
        elif breakage == "enum":
            ts = next(p for p in dash["panels"] if p["type"] == "stat")
            ts["fieldConfig"]["defaults"]["thresholds"]["mode"] = "absolut"
        else:
            ts = next(p for p in dash["panels"] if p["type"] == "timeseries")
            ts["options"]["legend"]["placement"] = "top"
        out = tmp_path / breakage
        out.mkdir()
        proc = typecheck(dashboard_ts(dash), out)
        assert proc.returncode != 0, f"tsc accepted a dashboard with a broken {breakage}"
        errors = [line for line in proc.stdout.splitlines() if "error TS" in line]
        assert len(errors) == 1 and message in errors[0], proc.stdout


def test_dashboard_panels_and_variables() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "modelcache", "model"} <= set(variables)
    exprs = [e for _, e in dashboard_targets(dash)]
    joined = "\n".join(exprs)
    # One panel per item of the issue, found by what its queries read.
    for needle in (
        "modelcache_model_load_seconds_sum",  # load seconds by stage and model
        "by (model, stage)",
        "modelcache_model_loads_total",  # load outcomes
        "by (model, outcome)",
        "modelcache_meta_tensor_errors_total",  # meta-tensor errors by kind
        "by (kind)",
        "modelcache_model_loaded",  # per-model loaded state
        "modelcache_model_weight_bytes",  # weight bytes per device
        "by (model, device)",
        "modelcache_requests_total",  # request rate / errors by code
        'code!="OK"',
        "histogram_quantile(0.5, sum by (le, phase) (rate(modelcache_request_duration_seconds",
        "histogram_quantile(0.99, sum by (le, phase) (rate(modelcache_request_duration_seconds",
        'phase=~"queue|compute"',
        "modelcache_batch_size_bucket",  # batch size and tokens
        "modelcache_batch_tokens_bucket",
        "modelcache_tokens_total",
        "modelcache_queue_depth",  # queue depth
        "modelcache_build_info",  # version table
        "modelcache_operator_reconcile_total",
    ):
        assert needle in joined, needle
    build_table = next(p for p in dash["panels"] if p["title"].startswith("Build info"))
    assert build_table["type"] == "table" and build_table["targets"][0]["format"] == "table"
    # Every daemon query filters on the template variables.
    for title, expr in dashboard_targets(dash):
        if "modelcache_operator" in expr:
            continue
        assert '"$namespace"' in expr and '"$modelcache"' in expr, title
        if "build_info" not in expr and "device_memory" not in expr:
            assert '"$model"' in expr, title
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses every query (as a recording rule), with Grafana's variables filled in."""
    dash = dashboard()
    exprs = [grafana_to_promql(e) for _, e in dashboard_targets(dash)]
    exprs += [
        grafana_to_promql(variable_selector(v["query"]))
        for v in dash["templating"]["list"]
        if v["type"] == "query"
    ]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump(rules))
    out = run([tool("promtool"), "check", "rules", str(tmp_path / "queries.yaml")])
    assert f"SUCCESS: {len(exprs)} rules found" in out.stdout


def test_dashboard_metrics_are_exported_by_a_live_daemon(tmp_path: Path) -> None:
    with running_daemon(tmp_path) as daemon:
        live = daemon.metrics()
    run([tool("promtool"), "check", "metrics"], input=live)
    exported = exposition_names(live) | exposition_names(
        generate_latest(OPERATOR_REGISTRY).decode()
    )
    dash = dashboard()
    queries = dashboard_targets(dash) + [
        (f"variable {v['name']}", variable_selector(v["query"]))
        for v in dash["templating"]["list"]
        if v["type"] == "query"
    ]
    missing = {}
    for title, expr in queries:
        names = promql_metric_names(grafana_to_promql(expr))
        assert names, f"{title}: no metric in {expr}"
        if names - exported:
            missing[title] = sorted(names - exported)
    assert not missing, f"metrics neither the daemon nor the operator export: {missing}"
    # The live daemon really serves the loaded model's load-time series.
    assert 'modelcache_model_load_seconds_count{model="minilm",stage="total"} 1.0' in live
    assert 'modelcache_model_loaded{model="minilm"} 1.0' in live
