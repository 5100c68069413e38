"""The containers of a daemon pod: one ``modelcache download`` init container per hub model,
and the daemon itself, offline, with the model volume read-only.

Both run the same image; their command lines are checked against the real CLI parser in
the tests, so a renamed flag breaks a unit test, not a rollout.
"""

from __future__ import annotations

from typing import Any

from modelcache.operator.spec import ModelCacheSpec

Manifest = dict[str, Any]

CONFIG_FILE = "config.yaml"
CONFIG_DIR = "/etc/modelcache"
TLS_DIR = "/etc/modelcache-tls"  # the spec.tls Secret, read-only (not under CONFIG_DIR)
DAEMON = "daemon"
DOWNLOAD_PREFIX = "download-"


def _container_name(prefix: str, index: int, model: str) -> str:
    """A DNS label (container names allow no dots or underscores), unique by index."""
    clean = model.replace(".", "-").replace("_", "-")
    return f"{prefix}{index}-{clean}"[:63].rstrip("-")


def download_model_index(container_name: str) -> int | None:
    """The models[] index a download init container fetches (inverse of the builder)."""
    if not container_name.startswith(DOWNLOAD_PREFIX):
        return None
    head = container_name[len(DOWNLOAD_PREFIX) :].split("-", 1)[0]
    return int(head) if head.isdigit() else None


_SECURE = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}


def download_containers(spec: ModelCacheSpec) -> list[Manifest]:
    """One init container per hub model: ``modelcache download`` into the volume, which
    writes to a temporary directory and renames it into place, so the daemon never sees a
    partial checkpoint. Local sources are expected on the volume already. The daemon image
    sets HF_HUB_OFFLINE=1 for serving; this is the one container that may go online."""
    mount = spec.storage.mount_path
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "HF_HUB_OFFLINE", "value": "0"},
    ]
    if spec.hf_token_secret is not None:
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {
                    "secretKeyRef": {
                        "name": spec.hf_token_secret.name,
                        "key": spec.hf_token_secret.key,
                    }
                },
            }
        )
    out = []
    for i, m in enumerate(spec.models):
        if not m.is_hub_id:
            continue
        assert m.revision is not None  # ModelSpec requires it for hub ids
        out.append(
            {
                "name": _container_name(DOWNLOAD_PREFIX, i, m.name),
                "image": spec.image,
                "imagePullPolicy": spec.image_pull_policy,
                "command": [
                    "modelcache",
                    "download",
                    m.source,
                    "--revision",
                    m.revision,
                    "--to",
                    mount,
                ],
                "env": env,
                "resources": {
                    "requests": {"cpu": "100m", "memory": "256Mi"},
                    "limits": {"memory": "2Gi"},
                },
                "volumeMounts": [
                    {"name": "models", "mountPath": mount},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
                "securityContext": _SECURE,
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        )
    return out


def daemon_container(spec: ModelCacheSpec) -> Manifest:
    p = spec.ports
    resources = {
        k: v
        for k, v in (("limits", spec.resources.limits), ("requests", spec.resources.requests))
        if v
    }
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "TRANSFORMERS_OFFLINE", "value": "1"},
        {"name": "MODELCACHE_LOG_LEVEL", "value": spec.log_level},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "models", "mountPath": spec.storage.mount_path, "readOnly": True},
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if spec.tls is not None:
        env += [
            {"name": "MODELCACHE_TLS_CERT", "value": f"{TLS_DIR}/tls.crt"},
            {"name": "MODELCACHE_TLS_KEY", "value": f"{TLS_DIR}/tls.key"},
        ]
        if spec.tls.client_auth:
            env.append({"name": "MODELCACHE_TLS_CLIENT_CA", "value": f"{TLS_DIR}/ca.crt"})
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    return {
        "name": DAEMON,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": [
            "modelcache",
            "serve",
            "--config",
            f"{CONFIG_DIR}/{CONFIG_FILE}",
            "--host",
            "0.0.0.0",
            "--port",
            str(p.grpc),
            "--metrics-host",
            "0.0.0.0",
            "--metrics-port",
            str(p.metrics),
        ],
        "env": env,
        "ports": [
            {"name": "grpc", "containerPort": p.grpc, "protocol": "TCP"},
            {"name": "metrics", "containerPort": p.metrics, "protocol": "TCP"},
        ],
        # Ready once the gRPC port accepts: ListModels then tells which models loaded.
        "readinessProbe": {
            "tcpSocket": {"port": "grpc"},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "tcpSocket": {"port": "grpc"},
            "periodSeconds": 20,
            "failureThreshold": 6,
        },
        # Loading a large model can take many minutes before the port opens.
        "startupProbe": {
            "tcpSocket": {"port": "grpc"},
            "periodSeconds": 10,
            "failureThreshold": 360,
        },
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": _SECURE,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
