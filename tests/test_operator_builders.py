"""The operator's pure builders without a cluster: every child manifest (ConfigMap, PVC,
Service, Deployment) of a ModelCache, the commands its containers run, and the RBAC rules."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelcache import cli
from modelcache.config import parse_config
from modelcache.operator import builders
from modelcache.operator.builders import Owner
from modelcache.operator.spec import ModelCacheSpec, SpecError, parse_spec

ROOT = Path(__file__).resolve().parents[1]
FILES = ROOT / "deploy" / "helm" / "modelcache" / "files"
SHA = "0123456789abcdef0123456789abcdef01234567"
OWNER = Owner(name="cache", namespace="ns1", uid="uid-1")


def spec_dict(**extra: Any) -> dict[str, Any]:
    return {
        "image": "registry.example/modelcache:0.1.0",
        "models": [
            {"name": "minilm", "source": "org/minilm", "revision": SHA, "task": "embedding"},
            {"name": "local.one", "source": "tiny", "task": "causal-lm"},
        ],
        **extra,
    }


def spec(**extra: Any) -> ModelCacheSpec:
    return parse_spec("cache", spec_dict(**extra))


# --- children ---------------------------------------------------------------------------
def test_configmap_is_a_config_the_daemon_accepts() -> None:
    s = spec(storage={"mountPath": "/data/models", "emptyDir": {}}, batching={"max_batch_size": 8})
    cm = builders.build_configmap(s, OWNER)
    loaded = parse_config(yaml.safe_load(cm["data"]["config.yaml"]))
    assert [m.name for m in loaded.models] == ["minilm", "local.one"]
    assert str(loaded.model_root) == "/data/models"
    assert loaded.batching.max_batch_size == 8
    assert loaded.models[0].revision == SHA
    assert cm["metadata"]["name"] == "cache-config"


def test_every_child_has_owner_reference_labels_and_namespace() -> None:
    s = spec(storage={"pvc": {"size": "5Gi", "storageClassName": "fast"}})
    kids = builders.build_children(s, OWNER)
    assert [k["kind"] for k in kids] == [
        "ConfigMap",
        "PersistentVolumeClaim",
        "Service",
        "Service",
        "PodDisruptionBudget",
        "Deployment",
    ]
    for k in kids:
        meta = k["metadata"]
        assert meta["namespace"] == "ns1"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "modelcache.io/v1alpha1",
                "kind": "ModelCache",
                "name": "cache",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"]["app.kubernetes.io/instance"] == "cache"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "modelcache-operator"


def test_deployment_downloads_hub_models_and_serves_offline_read_only() -> None:
    s = spec()
    dep = builders.build_deployment(s, OWNER)
    pod = dep["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    daemon, fetch = pod["containers"]
    # the fetch container follows the same config file and downloads its hub models
    assert fetch["name"] == "fetch"
    assert fetch["command"] == [
        "modelcache",
        "fetch",
        "--config",
        "/etc/modelcache/config.yaml",
        "--to",
        "/models",
        "--watch",
    ]
    assert {"name": "models", "mountPath": "/models"} in fetch["volumeMounts"]
    assert fetch["resources"] == {
        "limits": {"memory": "1Gi"},
        "requests": {"cpu": "10m", "memory": "64Mi"},
    }
    # the image is offline for serving (HF_HUB_OFFLINE=1): only the fetch container goes online
    assert {"name": "HF_HUB_OFFLINE", "value": "0"} in fetch["env"]
    # probes: HTTP on the metrics port; ready means every model serves
    assert daemon["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert daemon["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert daemon["startupProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert dep["spec"]["minReadySeconds"] == builders.MIN_READY_SECONDS > 0
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    env = {e["name"]: e.get("value") for e in daemon["env"]}
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    mounts = {m["name"]: m for m in daemon["volumeMounts"]}
    assert mounts["models"] == {"name": "models", "mountPath": "/models", "readOnly": True}
    assert mounts["config"]["mountPath"] + "/config.yaml" in daemon["command"]
    assert {v["name"]: v for v in pod["volumes"]}["config"]["configMap"]["name"] == "cache-config"
    assert daemon["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False
    # selector, template labels and the Service agree
    selector = dep["spec"]["selector"]["matchLabels"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    svc = builders.build_service(s, OWNER)
    assert svc["spec"]["selector"] == selector and svc["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in svc["spec"]["ports"]] == [50051, 9400]
    # the ClusterIP Service: same pods, the gRPC port only, a virtual IP the cluster assigns
    vip = builders.build_cluster_ip_service(s, OWNER)
    assert vip["metadata"]["name"] == "cache-clusterip"
    assert vip["spec"]["selector"] == selector and vip["spec"]["type"] == "ClusterIP"
    assert "clusterIP" not in vip["spec"]
    assert [(p["name"], p["port"], p["targetPort"]) for p in vip["spec"]["ports"]] == [
        ("grpc", 50051, "grpc")
    ]


def test_built_commands_are_accepted_by_the_real_cli() -> None:
    """The daemon and fetch containers run `modelcache ...`: the CLI must parse them."""
    dep = builders.build_deployment(spec(ports={"grpc": 6000, "metrics": 6001}), OWNER)
    pod = dep["spec"]["template"]["spec"]
    serve = cli.parser().parse_args(pod["containers"][0]["command"][1:])
    assert (serve.command, serve.port, serve.metrics_port, serve.host) == (
        "serve",
        6000,
        6001,
        "0.0.0.0",
    )
    fetch = cli.parser().parse_args(pod["containers"][1]["command"][1:])
    assert (fetch.command, str(fetch.config), str(fetch.to), fetch.watch) == (
        "fetch",
        "/etc/modelcache/config.yaml",
        "/models",
        True,
    )


def test_storage_that_cannot_work_is_refused_with_what_to_use() -> None:
    with pytest.raises(SpecError, match=r"ReadWriteOnce\] with replicas 2.*ReadWriteMany"):
        spec(storage={"pvc": {"size": "1Gi"}}, replicas=2)
    with pytest.raises(SpecError, match=r"ReadOnlyMany\] but models minilm come from the hub"):
        spec(storage={"pvc": {"size": "1Gi", "accessModes": ["ReadOnlyMany"]}})
    shared = spec(storage={"pvc": {"size": "1Gi", "accessModes": ["ReadWriteMany"]}}, replicas=3)
    assert "affinity" not in builders.build_deployment(shared, OWNER)["spec"]["template"]["spec"]
    # one ReadWriteOnce replica: a surge pod must run on the node that holds the volume
    single = spec(storage={"pvc": {"size": "1Gi"}}, affinity={"nodeAffinity": {"x": 1}})
    pod = builders.build_deployment(single, OWNER)["spec"]["template"]["spec"]
    assert pod["affinity"]["nodeAffinity"] == {"x": 1}
    (term,) = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term == {
        "labelSelector": {"matchLabels": builders.selector_labels("cache")},
        "topologyKey": "kubernetes.io/hostname",
    }
    # read-only volume with local models: no fetch container (it would write)
    ro = parse_spec(
        "cache",
        {
            **spec_dict(),
            "models": spec_dict()["models"][1:],
            "storage": {"pvc": {"size": "1Gi", "accessModes": ["ReadOnlyMany"]}},
        },
    )
    names = [c["name"] for c in builders.build_pod_template(ro, OWNER)["spec"]["containers"]]
    assert names == ["daemon"]


def test_scheduling_gpu_and_secrets_reach_the_pod() -> None:
    s = spec(
        resources={"limits": {"nvidia.com/gpu": 1, "memory": "8Gi"}, "requests": {"cpu": "2"}},
        nodeSelector={"gpu": "a100"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        affinity={"nodeAffinity": {"x": 1}},
        imagePullSecrets=[{"name": "regcred"}],
        hfTokenSecret={"name": "hf"},
        updateStrategy="Recreate",
        replicas=3,
    )
    dep = builders.build_deployment(s, OWNER)
    pod = dep["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"] == {  # quantities as the API's strings
        "limits": {"nvidia.com/gpu": "1", "memory": "8Gi"},
        "requests": {"cpu": "2"},
    }
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["affinity"] == {"nodeAffinity": {"x": 1}}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    token = [e for e in pod["containers"][1]["env"] if e["name"] == "HF_TOKEN"]
    assert token == [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    ]
    assert dep["spec"]["strategy"] == {"type": "Recreate"} and dep["spec"]["replicas"] == 3
    assert yaml.safe_load(builders.config_text(s))["models"][0]["device"] == "cuda"


@pytest.mark.parametrize(
    ("storage", "volume"),
    [
        ({"existingClaim": "shared"}, {"persistentVolumeClaim": {"claimName": "shared"}}),
        (
            {"hostPath": {"path": "/var/cache/models"}},
            {"hostPath": {"path": "/var/cache/models", "type": "DirectoryOrCreate"}},
        ),
        ({"emptyDir": {"sizeLimit": "10Gi"}}, {"emptyDir": {"sizeLimit": "10Gi"}}),
        ({"pvc": {"size": "1Gi"}}, {"persistentVolumeClaim": {"claimName": "cache-models"}}),
    ],
)
def test_model_volume_kinds(storage: dict[str, Any], volume: dict[str, Any]) -> None:
    s = spec(storage=storage)
    pod = builders.build_deployment(s, OWNER)["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["models"] == {"name": "models", **volume}
    pvc = builders.build_pvc(s, OWNER)
    assert (pvc is not None) == ("pvc" in storage)


def test_pvc_manifest() -> None:
    pvc = builders.build_pvc(spec(storage={"pvc": {"size": "20Gi", "storageClassName": ""}}), OWNER)
    assert pvc is not None
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "",
        "resources": {"requests": {"storage": "20Gi"}},
    }


def test_model_edits_reach_pods_live_and_only_pod_level_changes_roll_them() -> None:
    a, b = spec(), spec()
    assert builders.build_children(a, OWNER) == builders.build_children(b, OWNER)
    dep = builders.build_deployment(a, OWNER)
    # models, batching and the log level: a new config file, the same pods
    for change in (
        {"models": spec_dict()["models"][:1]},
        {"batching": {"max_batch_size": 8}},
        {"logLevel": "DEBUG"},
    ):
        edited = parse_spec("cache", {**spec_dict(), **change})
        assert builders.build_deployment(edited, OWNER) == dep, change
        assert builders.config_hash(edited) != builders.config_hash(a), change
    assert yaml.safe_load(builders.config_text(spec(logLevel="DEBUG")))["log_level"] == "DEBUG"
    # image, resources, scheduling: a new pod template, rolled out
    t1 = dep["spec"]["template"]["metadata"]["annotations"][builders.TEMPLATE_HASH]
    for change in (
        {"resources": {"requests": {"cpu": "1"}}},
        {"image": "registry.example/modelcache:0.2.0"},
        {"nodeSelector": {"pool": "gpu"}},
    ):
        other = builders.build_deployment(spec(**change), OWNER)
        assert other["spec"]["template"]["metadata"]["annotations"][builders.TEMPLATE_HASH] != t1
    assert builders.template_hash(a, OWNER) == t1


def test_endpoint_is_a_dns_target_for_client_side_balancing() -> None:
    assert (
        builders.endpoint(OWNER, spec(), "cluster.local")
        == "dns:///cache.ns1.svc.cluster.local:50051"
    )


def test_rbac_rules_are_least_privilege() -> None:
    rules = yaml.safe_load((FILES / "operator-rbac-rules.yaml").read_text())
    granted = {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert not any("*" in item for item in granted)
    assert not any(r in ("pods/exec", "nodes") for _, r, _ in granted)
    # spec.tls's Secret is read by name; secrets are never listed, watched or written.
    assert {v for _, r, v in granted if r == "secrets"} == {"get"}
    assert not any(
        v in ("delete", "deletecollection", "escalate", "bind", "impersonate")
        for _, _, v in granted
    )
    assert ("", "pods", "list") in granted
    assert ("modelcache.io", "modelcaches/status", "patch") in granted


def test_pvcs_are_only_ever_grown() -> None:
    from modelcache.operator.children import _grow_pvc

    def pvc(size: str) -> dict[str, Any]:
        return {"spec": {"resources": {"requests": {"storage": size}}}}

    assert _grow_pvc(pvc("10Gi"), pvc("5Gi")) is None
    assert _grow_pvc(pvc("10Gi"), pvc("10240Mi")) is None
    grown = _grow_pvc(pvc("10Gi"), pvc("20G"))
    assert grown is not None and grown["spec"]["resources"]["requests"]["storage"] == "20G"


def test_a_changed_cluster_ip_service_keeps_its_virtual_ip() -> None:
    """A replace without spec.clusterIP is refused by the API server (immutable field)."""
    from modelcache.operator.children import APPLIED_HASH, plan_child

    desired = builders.build_cluster_ip_service(spec(ports={"grpc": 6000}), OWNER)
    actual = copy.deepcopy(builders.build_cluster_ip_service(spec(), OWNER))
    actual["metadata"].update(
        resourceVersion="7", annotations={APPLIED_HASH: "old", "modelcache.io/generation": "1"}
    )
    actual["spec"].update(clusterIP="10.96.3.4", clusterIPs=["10.96.3.4"])

    class Kube:
        def read(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
            assert (kind, namespace, name) == ("Service", "ns1", "cache-clusterip")
            return actual

    plan = plan_child(Kube(), desired, "uid-1", generation=2)  # type: ignore[arg-type]
    assert plan.body is not None and not plan.create
    assert plan.body["spec"]["clusterIP"] == "10.96.3.4"
    assert plan.body["spec"]["clusterIPs"] == ["10.96.3.4"]
    assert plan.body["spec"]["ports"][0]["port"] == 6000
    assert plan.body["metadata"]["resourceVersion"] == "7"


def test_scheduling_passthrough_spreading_and_disruption_budget() -> None:
    s = spec(
        priorityClassName="ml-high",
        runtimeClassName="nvidia",
        podAnnotations={"karpenter.sh/do-not-disrupt": "true"},
        podLabels={"kueue.x-k8s.io/queue-name": "gpu", "app.kubernetes.io/name": "spoof"},
        env=[{"name": "HF_ENDPOINT", "value": "https://mirror.internal"}],
        terminationGracePeriodSeconds=60,
        drainSeconds=30,
        replicas=3,
        storage={"emptyDir": {}},
    )
    pod_template = builders.build_pod_template(s, OWNER)
    pod = pod_template["spec"]
    assert (pod["priorityClassName"], pod["runtimeClassName"]) == ("ml-high", "nvidia")
    assert pod["terminationGracePeriodSeconds"] == 60
    meta = pod_template["metadata"]
    assert meta["annotations"]["karpenter.sh/do-not-disrupt"] == "true"
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    assert meta["labels"]["app.kubernetes.io/name"] == "modelcache"  # the selector's, not theirs
    for c in pod["containers"]:
        assert {"name": "HF_ENDPOINT", "value": "https://mirror.internal"} in c["env"]
    daemon_env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert daemon_env["MODELCACHE_DRAIN_S"] == "30"
    # spread over nodes by default; [] turns it off
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert (
        "topologySpreadConstraints"
        not in builders.build_pod_template(spec(topologySpreadConstraints=[]), OWNER)["spec"]
    )
    pdb = builders.build_pdb(s, OWNER)
    assert pdb is not None and pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": builders.selector_labels("cache")},
    }
    assert builders.build_pdb(spec(podDisruptionBudget={"enabled": False}), OWNER) is None
    with pytest.raises(SpecError, match=r"terminationGracePeriodSeconds is 20.*at least 40"):
        spec(terminationGracePeriodSeconds=20, drainSeconds=30)


def test_gpu_resource_names_and_models_spread_over_the_gpus() -> None:
    mig = spec(
        gpuResource="nvidia.com/mig-1g.10gb",
        resources={"limits": {"nvidia.com/mig-1g.10gb": 1}},
    )
    assert {m.device for m in mig.models} == {"cuda"}
    amd = parse_spec(
        "cache",
        {
            **spec_dict(),
            "gpuResource": "amd.com/gpu",
            "resources": {"limits": {"amd.com/gpu": 2}},
            "models": [
                {"name": f"m{i}", "source": f"local{i}", "task": "embedding"} for i in range(3)
            ]
            + [{"name": "pinned", "source": "p", "task": "embedding", "device": "cuda:0"}],
        },
    )
    assert [m.device for m in amd.models] == ["cuda:0", "cuda:1", "cuda:0", "cuda:0"]
    # a GPU resource the pod does not get leaves the models on the CPU...
    assert {m.device for m in spec(resources={"limits": {"amd.com/gpu": 1}}).models} == {"cpu"}
    # ...and naming a device it does not get says which resource to set
    with pytest.raises(SpecError, match=r"resources.limits\['amd.com/gpu'\]"):
        parse_spec(
            "cache",
            {
                **spec_dict(),
                "gpuResource": "amd.com/gpu",
                "models": [{"name": "a", "source": "a", "task": "embedding", "device": "cuda"}],
            },
        )
