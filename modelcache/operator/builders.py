"""Pure builders of a ModelCache's children: ConfigMap, PersistentVolumeClaim, Services, Deployment.

Each takes the validated spec and the owner's identity and returns a plain manifest dict; no
API calls, so every field is unit-tested without a cluster and a reconcile either has all
its manifests or none (no partial children). The daemon config is rendered through the
daemon's own parser (``parse_config``), so the operator cannot write a file the daemon
refuses.

What rolls the pods and what does not: the config file (models, batching, log level) is
mounted from a ConfigMap the kubelet updates in place, and the daemon and its fetch
container follow it live, so a model edit changes no pod. Image, resources and scheduling
are pod-level: they change the pod template, and the Deployment rolls with a surge and
``minReadySeconds`` (a new pod must be Ready, i.e. serve every model, before an old one
goes). ``template-hash`` (the whole pod template) tells pods of the current spec from pods
of an older one; ``config_hash`` (the config file's bytes) is what the daemons report once
they applied it (ListModels), so the status can count the pods that run the current one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import yaml

from modelcache.config import DaemonConfig, parse_config
from modelcache.operator.containers import (
    CONFIG_FILE,
    DAEMON,
    daemon_container,
    fetch_container,
)
from modelcache.operator.spec import API_VERSION, KIND, ModelCacheSpec

Manifest = dict[str, Any]

TEMPLATE_HASH = "modelcache.io/template-hash"
RUN_AS = 10001  # any non-root uid: the image must not depend on it (HOME is /tmp)
#: A new pod must stay Ready this long before the rollout takes an old one away.
MIN_READY_SECONDS = 5


@dataclass(frozen=True)
class Owner:
    """The ModelCache the children belong to (their owner reference and names)."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def selector_labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "modelcache",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": DAEMON,
    }


def common_labels(name: str) -> dict[str, str]:
    return {
        **selector_labels(name),
        "app.kubernetes.io/part-of": "modelcache",
        "app.kubernetes.io/managed-by": "modelcache-operator",
    }


def config_map_name(name: str) -> str:
    return f"{name}-config"


def pvc_name(name: str) -> str:
    return f"{name}-models"


def digest(data: object) -> str:
    """A short stable hash of JSON-able data (sorted keys)."""
    raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def _meta(owner: Owner, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": common_labels(owner.name),
        "ownerReferences": [owner.reference()],
    }


def render_config(spec: ModelCacheSpec) -> DaemonConfig:
    """The daemon's config for this spec, validated by the daemon's own parser."""
    return parse_config(
        {
            "models": [m.model_dump(mode="json") for m in spec.models],
            "model_root": spec.storage.mount_path,
            "batching": spec.batching.model_dump(mode="json"),
            "log_level": spec.log_level,
        },
        origin="spec.models",
    )


def config_text(spec: ModelCacheSpec) -> str:
    return yaml.safe_dump(render_config(spec).model_dump(mode="json"), sort_keys=True)


def config_hash(spec: ModelCacheSpec) -> str:
    return hashlib.sha256(config_text(spec).encode()).hexdigest()[:16]


def endpoint(owner: Owner, spec: ModelCacheSpec, cluster_domain: str) -> str:
    """A gRPC target that resolves to every ready pod (headless Service) for client-side LB."""
    return f"dns:///{owner.name}.{owner.namespace}.svc.{cluster_domain}:{spec.ports.grpc}"


def build_configmap(spec: ModelCacheSpec, owner: Owner) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(owner, config_map_name(owner.name)),
        "data": {CONFIG_FILE: config_text(spec)},
    }


def build_pvc(spec: ModelCacheSpec, owner: Owner) -> Manifest | None:
    """The model volume's claim, when the spec asks the operator to create one."""
    pvc = spec.storage.pvc
    if pvc is None:
        return None
    body: dict[str, Any] = {
        "accessModes": list(pvc.access_modes),
        "resources": {"requests": {"storage": pvc.size}},
    }
    if pvc.storage_class_name is not None:
        body["storageClassName"] = pvc.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(owner, pvc_name(owner.name)),
        "spec": body,
    }


def cluster_ip_service_name(name: str) -> str:
    return f"{name}-clusterip"


def build_service(spec: ModelCacheSpec, owner: Owner) -> Manifest:
    """Headless: DNS returns every ready pod, so gRPC clients balance across replicas."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(owner, owner.name),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(owner.name),
            "publishNotReadyAddresses": False,
            "ports": [
                {
                    "name": "grpc",
                    "port": spec.ports.grpc,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "grpc",
                },
                {
                    "name": "metrics",
                    "port": spec.ports.metrics,
                    "targetPort": "metrics",
                    "protocol": "TCP",
                    "appProtocol": "http",
                },
            ],
        },
    }


def build_cluster_ip_service(spec: ModelCacheSpec, owner: Owner) -> Manifest:
    """One virtual IP for the gRPC port, balanced per connection by kube-proxy: for clients
    that cannot balance over DNS answers (grpcurl, other languages' defaults, port-forward,
    an Ingress or a mesh). Only Ready pods are behind it. No metrics port: metrics are per
    pod (the headless Service and the PodMonitor scrape each one)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(owner, cluster_ip_service_name(owner.name)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(owner.name),
            "ports": [
                {
                    "name": "grpc",
                    "port": spec.ports.grpc,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "grpc",
                },
            ],
        },
    }


def _model_volume(spec: ModelCacheSpec, owner: Owner) -> Manifest:
    s = spec.storage
    if s.pvc is not None:
        return {"name": "models", "persistentVolumeClaim": {"claimName": pvc_name(owner.name)}}
    if s.existing_claim is not None:
        return {"name": "models", "persistentVolumeClaim": {"claimName": s.existing_claim}}
    if s.host_path is not None:
        return {"name": "models", "hostPath": {"path": s.host_path.path, "type": s.host_path.type}}
    empty: dict[str, Any] = {}
    if s.empty_dir is not None and s.empty_dir.size_limit is not None:
        empty["sizeLimit"] = s.empty_dir.size_limit
    return {"name": "models", "emptyDir": empty}


def build_pod_template(spec: ModelCacheSpec, owner: Owner) -> Manifest:
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # The shutdown delay, then the daemon's drain of in-flight requests (checked in spec).
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
        "containers": [daemon_container(spec)]
        + ([fetch_container(spec)] if spec.writable_storage else []),
        "volumes": [
            _model_volume(spec, owner),
            {"name": "config", "configMap": {"name": config_map_name(owner.name)}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if spec.tls is not None:
        # Readable by the daemon's group only (fsGroup); a missing Secret keeps the pod
        # in ContainerCreating, which the status reports, rather than serving plaintext.
        pod["volumes"].append(
            {"name": "tls", "secret": {"secretName": spec.tls.secret_name, "defaultMode": 0o440}}
        )
    optional = {
        "serviceAccountName": spec.service_account_name,
        "nodeSelector": spec.node_selector or None,
        "tolerations": [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations]
        or None,
        "affinity": _affinity(spec, owner),
        "topologySpreadConstraints": _spread(spec, owner),
        "priorityClassName": spec.priority_class_name,
        "runtimeClassName": spec.runtime_class_name,
        "imagePullSecrets": [{"name": s.name} for s in spec.image_pull_secrets] or None,
    }
    pod.update({k: v for k, v in optional.items() if v is not None})
    labels = {**spec.pod_labels, **common_labels(owner.name)}  # ours win: the selector
    template: dict[str, Any] = {"metadata": {"labels": labels}, "spec": pod}
    if spec.pod_annotations:
        template["metadata"]["annotations"] = dict(spec.pod_annotations)
    template["metadata"]["annotations"] = {
        **template["metadata"].get("annotations", {}),
        TEMPLATE_HASH: digest(template),
    }
    return template


def _spread(spec: ModelCacheSpec, owner: Owner) -> list[dict[str, Any]] | None:
    """Replicas on different nodes when possible, so a node drain or loss takes one of them,
    not all (best effort: ScheduleAnyway); ``topologySpreadConstraints: []`` turns it off."""
    if spec.topology_spread_constraints is not None:
        return list(spec.topology_spread_constraints) or None
    return [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector_labels(owner.name)},
        }
    ]


def _affinity(spec: ModelCacheSpec, owner: Owner) -> dict[str, Any] | None:
    """The spec's affinity; with a ReadWriteOnce claim, also every pod on the node of the
    others (a surge pod elsewhere would wait in Multi-Attach; the first pod, alone, matches
    its own term and goes anywhere)."""
    if not spec.single_node_volume:
        return spec.affinity
    together = {
        "labelSelector": {"matchLabels": selector_labels(owner.name)},
        "topologyKey": "kubernetes.io/hostname",
    }
    affinity = dict(spec.affinity or {})
    pod_affinity = dict(affinity.get("podAffinity") or {})
    required = list(pod_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or [])
    pod_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = [*required, together]
    affinity["podAffinity"] = pod_affinity
    return affinity


def template_hash(spec: ModelCacheSpec, owner: Owner) -> str:
    """The pod template's hash: pods carrying it run the current spec."""
    return str(build_pod_template(spec, owner)["metadata"]["annotations"][TEMPLATE_HASH])


def build_deployment(spec: ModelCacheSpec, owner: Owner) -> Manifest:
    template = build_pod_template(spec, owner)
    if spec.update_strategy == "Recreate":
        strategy: dict[str, Any] = {"type": "Recreate"}
    else:  # keep serving during a rollout: a new pod must download and load first
        strategy = {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    meta = _meta(owner, owner.name)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": spec.replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(owner.name)},
            "strategy": strategy,
            "minReadySeconds": MIN_READY_SECONDS,
            "progressDeadlineSeconds": 1800,
            "template": template,
        },
    }


def pdb_name(name: str) -> str:
    return name


def build_pdb(spec: ModelCacheSpec, owner: Owner) -> Manifest | None:
    """At most ``maxUnavailable`` daemon pods evicted at a time (node drains, cluster
    autoscaler consolidation); harmless with one replica (it may still be evicted)."""
    if not spec.pod_disruption_budget.enabled:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(owner, pdb_name(owner.name)),
        "spec": {
            "maxUnavailable": spec.pod_disruption_budget.max_unavailable,
            "selector": {"matchLabels": selector_labels(owner.name)},
        },
    }


def build_children(spec: ModelCacheSpec, owner: Owner) -> list[Manifest]:
    """Every child, in the order to apply them (the Deployment last: its pods need the rest)."""
    pvc = build_pvc(spec, owner)
    pdb = build_pdb(spec, owner)
    return [
        build_configmap(spec, owner),
        *([pvc] if pvc else []),
        build_service(spec, owner),
        build_cluster_ip_service(spec, owner),
        *([pdb] if pdb else []),
        build_deployment(spec, owner),
    ]
