"""The Helm chart (deploy/helm/modelcache) with a real helm v3 (hack/system-deps.sh): lint,
render with every flag, and check what it renders against the files and code it must agree
with: the CRDs and RBAC rules in files/, the operator's settings, and the labels and port
names of the daemon pods and Services the operator builds. tests/kube/test_helm_install.py
installs it on a real control plane."""

from __future__ import annotations

import copy
import json
import tomllib
from typing import Any

import pytest
import yaml
from monitoring.tools import CHART, REPO, find, helm_template, render, run, tool

from modelcache.operator import builders
from modelcache.operator.settings import OperatorSettings
from modelcache.operator.spec import parse_spec

FILES = CHART / "files"
ALL_ON = {
    "monitoring": {
        "serviceMonitor": {"enabled": True},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "dashboard": {"enabled": True},
        "labels": {"release": "kube-prometheus-stack"},
    },
    "networkPolicy": {"enabled": True, "namespaces": ["team-a", "team-b"]},
}
CLUSTER_SCOPED = {"namespaces", "customresourcedefinitions", "clusterkopfpeerings"}


def file_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = yaml.safe_load((FILES / "operator-rbac-rules.yaml").read_text())
    return rules


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def kinds(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((d["kind"], d["metadata"]["name"]) for d in docs)


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "everything-on"])
def test_helm_lint(values: dict[str, Any] | None) -> None:
    cmd = [tool("helm"), "lint", "--strict", str(CHART)]
    if values:
        cmd += ["--values", "-"]
    out = run(cmd, input=yaml.safe_dump(values) if values else None)
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


def test_chart_versions_follow_pyproject() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == pyproject["project"]["version"]


def test_default_objects() -> None:
    docs = render()
    assert kinds(docs) == [
        ("ClusterRole", "mc-modelcache-edit"),
        ("ClusterRole", "mc-modelcache-operator"),
        ("ClusterRole", "mc-modelcache-view"),
        ("ClusterRoleBinding", "mc-modelcache-operator"),
        ("CustomResourceDefinition", "clusterkopfpeerings.kopf.dev"),
        ("CustomResourceDefinition", "kopfpeerings.kopf.dev"),
        ("CustomResourceDefinition", "modelcaches.modelcache.io"),
        ("Deployment", "mc-modelcache-operator"),
        ("Service", "mc-modelcache-operator-metrics"),
        ("ServiceAccount", "mc-modelcache-operator"),
    ]
    for d in docs:
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"):
            assert d["metadata"]["namespace"] == "modelcache", d["metadata"]
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "modelcache"


def test_everything_on_objects() -> None:
    docs = render(values=ALL_ON)
    got = {k for k in kinds(docs)}
    for expected in [
        ("ServiceMonitor", "mc-modelcache-daemons"),
        ("ServiceMonitor", "mc-modelcache-operator"),
        ("PodMonitor", "mc-modelcache-daemons"),
        ("PodMonitor", "mc-modelcache-operator"),
        ("PrometheusRule", "mc-modelcache"),
        ("ConfigMap", "mc-modelcache-dashboard"),
    ]:
        assert expected in got, expected
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["team-a", "team-b"]
    for d in docs:
        if d["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
            assert d["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def _file_docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((FILES / name).read_text()) if d]


def test_crds_are_the_files_with_keep_annotation() -> None:
    docs = render("--show-only", "templates/crds.yaml")
    expected = {
        d["metadata"]["name"]: d
        for n in ("crd-modelcaches.yaml", "crd-kopf-peering.yaml")
        for d in _file_docs(n)
    }
    assert {d["metadata"]["name"] for d in docs} == set(expected)
    for d in docs:
        want = copy.deepcopy(expected[d["metadata"]["name"]])
        meta = d["metadata"]
        assert meta["annotations"]["helm.sh/resource-policy"] == "keep"
        for k, v in (want["metadata"].get("labels") or {}).items():
            assert meta["labels"][k] == v  # the file's own labels win
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        # Everything but labels/annotations is the file, value for value (int/float alike).
        strip = {**d, "metadata": {"name": meta["name"]}}
        want["metadata"] = {"name": meta["name"]}
        assert strip == want


def test_crd_flags() -> None:
    docs = render("--show-only", "templates/crds.yaml", values={"crds": {"keep": False}})
    assert docs and all(
        "annotations" not in d["metadata"]
        or "helm.sh/resource-policy" not in d["metadata"]["annotations"]
        for d in docs
    )
    out = helm_template(
        "--show-only",
        "templates/crds.yaml",
        values={"crds": {"enabled": False, "peering": False}},
        check=False,
    )
    assert out.returncode != 0 and "could not find template" in out.stderr
    # the ModelCache CRD and kopf's peering CRDs (shared by kopf operators) each on a flag
    names = [d["metadata"]["name"] for d in render(values={"crds": {"enabled": False}})]
    assert "modelcaches.modelcache.io" not in names and "kopfpeerings.kopf.dev" in names
    names = [d["metadata"]["name"] for d in render(values={"crds": {"peering": False}})]
    assert "modelcaches.modelcache.io" in names and "kopfpeerings.kopf.dev" not in names
    assert not [
        d
        for d in render(values={"crds": {"enabled": False, "peering": False}})
        if d["kind"] == "CustomResourceDefinition"
    ]


def test_aggregated_roles_let_namespace_users_manage_modelcaches() -> None:
    docs = render()
    edit = find(docs, "ClusterRole", "mc-modelcache-edit")
    labels = edit["metadata"]["labels"]
    assert labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert ("modelcache.io", "modelcaches/scale", "patch") in grants(edit["rules"])
    view = find(docs, "ClusterRole", "mc-modelcache-view")
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert {v for _, _, v in grants(view["rules"])} == {"get", "list", "watch"}
    off = render(values={"rbac": {"aggregateToDefaultRoles": False}})
    assert [d["metadata"]["name"] for d in off if d["kind"] == "ClusterRole"] == [
        "mc-modelcache-operator"
    ]


def test_daemon_defaults_reach_the_operator_as_json() -> None:
    values = {
        "daemon": {
            "image": {"repository": "registry.example/modelcache", "tag": "0.2.0"},
            "defaults": {
                "priorityClassName": "ml",
                "imagePullSecrets": [{"name": "regcred"}],
                "storageClassName": "fast",
            },
        }
    }
    deployment = find(render(values=values), "Deployment")
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert json.loads(env["MODELCACHE_OPERATOR_DAEMON_DEFAULTS"]) == {
        "image": "registry.example/modelcache:0.2.0",
        "priorityClassName": "ml",
        "imagePullSecrets": [{"name": "regcred"}],
        "storageClassName": "fast",
    }


def test_cluster_role_is_exactly_the_rules_file() -> None:
    docs = render()
    role = find(docs, "ClusterRole", "mc-modelcache-operator")
    assert grants(role["rules"]) == grants(file_rules())
    binding = find(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "mc-modelcache-operator", "namespace": "modelcache"}
    ]


def test_namespaced_operator_gets_roles_in_its_namespaces_only() -> None:
    docs = render(values={"operator": {"watchNamespaces": ["team-a", "team-b"]}})
    cluster_role = find(docs, "ClusterRole", "mc-modelcache-operator-cluster")
    cluster_grants = grants(cluster_role["rules"])
    assert {r for _, r, _ in cluster_grants} <= CLUSTER_SCOPED - {"clusterkopfpeerings"}
    roles = [d for d in docs if d["kind"] == "Role"]
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for role in roles:
        assert not {r for _, r, _ in grants(role["rules"])} & CLUSTER_SCOPED
        # Cluster-wide plus per-namespace grants are the file's, less the cluster peering.
        assert cluster_grants | grants(role["rules"]) == {
            g for g in grants(file_rules()) if g[1] != "clusterkopfpeerings"
        }
    deploy = find(docs, "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["--namespace=team-a", "--namespace=team-b"]


def test_operator_pod_is_locked_down() -> None:
    deploy = find(render(), "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert c["image"] == "ghcr.io/modelcache/modelcache-operator:0.1.0"
    assert c["command"] == ["python", "-m", "modelcache.operator"]
    assert c["args"] == ["--all-namespaces"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["resources"]["limits"]["memory"]


def test_operator_env_names_operator_settings() -> None:
    """Every MODELCACHE_OPERATOR_* the chart sets is a field of OperatorSettings, with a value
    it accepts."""
    deploy = find(render(values={"operator": {"statusInterval": 2.5}}), "Deployment")
    env = {
        e["name"]: e.get("value")
        for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert "fieldRef" in str(deploy)  # POD_NAME from the downward API: the peering identity
    prefix = "MODELCACHE_OPERATOR_"
    fields = {k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix)}
    assert len(fields) >= 6
    assert set(fields) <= set(OperatorSettings.model_fields), set(fields) - set(
        OperatorSettings.model_fields
    )
    settings = OperatorSettings(**fields)
    assert settings.status_interval == 2.5
    assert settings.metrics_port == 8080 and settings.liveness_port == 8081


def test_image_tag_and_digest() -> None:
    def image(values: dict[str, Any]) -> str:
        deploy = find(render(values=values), "Deployment")
        return str(deploy["spec"]["template"]["spec"]["containers"][0]["image"])

    assert image({"image": {"tag": "1.2.3"}}) == "ghcr.io/modelcache/modelcache-operator:1.2.3"
    digest = "sha256:" + "a" * 64
    assert image({"image": {"repository": "r.example/op", "digest": digest}}) == (
        f"r.example/op@{digest}"
    )


@pytest.mark.parametrize(
    "values,message",
    [
        ({"operator": {"replicas": "two"}}, "operator.replicas: Invalid type. Expected: integer"),
        ({"crds": {"keep": "yes"}}, "crds.keep: Invalid type. Expected: boolean"),
        ({"image": {"tag": "latest"}}, "image.tag: Must not validate the schema"),
        ({"image": {"digest": "sha256:abc"}}, "image.digest: Does not match pattern"),
        ({"operator": {"watchNamespaces": "team-a"}}, "operator.watchNamespaces: Invalid type"),
        ({"operator": {"metricsPort": 70000}}, "operator.metricsPort: Must be less than or equal"),
        ({"operator": {"stautsInterval": 5}}, "Additional property stautsInterval is not allowed"),
        (
            {"monitoring": {"prometheusRule": {"notReadyMinutes": "15m"}}},
            "monitoring.prometheusRule.notReadyMinutes: Invalid type. Expected: integer",
        ),
        (
            {"monitoring": {"prometheusRule": {"resourceExhaustedRatio": 5}}},
            "resourceExhaustedRatio: Must be less than or equal to 1",
        ),
        (
            {"monitoring": {"dashboard": {"labels": {"grafana_dashboard": 1}}}},
            "grafana_dashboard: Invalid type. Expected: string",
        ),
        ({"networkPolicy": {"enabled": "true"}}, "networkPolicy.enabled: Invalid type"),
        ({"monitoring": {"serviceMonitor": {"interval": "often"}}}, "Does not match pattern"),
    ],
)
def test_schema_rejects_wrong_types(values: dict[str, Any], message: str) -> None:
    out = helm_template(values=values, check=False)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


def _daemon_objects() -> tuple[dict[str, Any], dict[str, Any]]:
    """The Service and pod template the operator builds for a ModelCache."""
    spec = parse_spec(
        "emb",
        {
            "image": "r.example/modelcache:0.1.0",
            "models": [{"name": "m", "source": "m", "task": "embedding"}],
        },
    )
    owner = builders.Owner(name="emb", namespace="team-a", uid="u")
    return builders.build_service(spec, owner), builders.build_pod_template(spec, owner)


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_monitors_select_the_daemons_the_operator_builds() -> None:
    service, template = _daemon_objects()
    docs = render(values=ALL_ON)
    sm = find(docs, "ServiceMonitor", "mc-modelcache-daemons")
    assert _matches(sm["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= port_names
    pm = find(docs, "PodMonitor", "mc-modelcache-daemons")
    assert _matches(pm["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])
    container_ports = {
        p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])
    }
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= container_ports
    for m in (sm["spec"]["endpoints"][0], pm["spec"]["podMetricsEndpoints"][0]):
        assert m["relabelings"] == [
            {
                "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
                "targetLabel": "modelcache",
            }
        ]
        assert template["metadata"]["labels"]["app.kubernetes.io/instance"] == "emb"
    # The operator's monitors select the operator's pods and metrics Service.
    deploy = find(docs, "Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    op_pm = find(docs, "PodMonitor", "mc-modelcache-operator")
    assert _matches(op_pm["spec"]["selector"]["matchLabels"], pod_labels)
    op_svc = find(docs, "Service", "mc-modelcache-operator-metrics")
    assert _matches(op_svc["spec"]["selector"], pod_labels)
    op_sm = find(docs, "ServiceMonitor", "mc-modelcache-operator")
    assert _matches(op_sm["spec"]["selector"]["matchLabels"], op_svc["metadata"]["labels"])
    # The operator's namespace label (the ModelCache's) must win over the target's.
    for m in (op_sm["spec"]["endpoints"][0], op_pm["spec"]["podMetricsEndpoints"][0]):
        assert m.get("honorLabels") is True


def test_monitors_follow_watched_namespaces() -> None:
    docs = render(values={**ALL_ON, "operator": {"watchNamespaces": ["team-a"]}})
    sm = find(docs, "ServiceMonitor", "mc-modelcache-daemons")
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    docs = render(values=ALL_ON)
    sm = find(docs, "ServiceMonitor", "mc-modelcache-daemons")
    assert sm["spec"]["namespaceSelector"] == {"any": True}


def test_network_policy_admits_clients_and_operator_to_grpc_only() -> None:
    _, template = _daemon_objects()
    docs = render(values=ALL_ON)
    pol = find(
        [
            d
            for d in docs
            if d["kind"] == "NetworkPolicy" and d["metadata"]["namespace"] == "team-a"
        ],
        "NetworkPolicy",
    )
    spec = pol["spec"]
    assert _matches(spec["podSelector"]["matchLabels"], template["metadata"]["labels"])
    assert spec["policyTypes"] == ["Ingress"]
    grpc_rule, metrics_rule = spec["ingress"]
    container_ports = {
        p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])
    }
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert metrics_rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert {"grpc", "metrics"} <= container_ports
    clients, operator = grpc_rule["from"]
    assert clients == {"podSelector": {"matchLabels": {"modelcache.io/client": "true"}}}
    deploy = find(docs, "Deployment")
    assert _matches(
        operator["podSelector"]["matchLabels"], deploy["spec"]["template"]["metadata"]["labels"]
    )
    assert operator["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "modelcache"}
    }
    assert "from" not in metrics_rule  # metrics: anyone, by default
    # Clients from other namespaces only when asked.
    docs = render(
        values={
            "networkPolicy": {
                "enabled": True,
                "clientNamespaceSelector": {"matchLabels": {"team": "ml"}},
            }
        }
    )
    pol = find(docs, "NetworkPolicy")
    assert pol["metadata"]["namespace"] == "modelcache"
    assert pol["spec"]["ingress"][0]["from"][0]["namespaceSelector"] == {
        "matchLabels": {"team": "ml"}
    }


def test_no_template_renders_a_privileged_or_root_container() -> None:
    for d in render(values=ALL_ON):
        text = json.dumps(d)
        assert '"privileged": true' not in text
        assert '"runAsUser": 0' not in text
        assert '"hostNetwork": true' not in text
