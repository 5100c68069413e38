"""The containers of a daemon pod: the daemon itself, offline, with the model volume
read-only, and the ``fetch`` container, which downloads the configuration's hub models onto
the volume, at start and whenever the configuration gains one (no restart).

Both run the same image and read the same config file, which the kubelet updates in place
when the ConfigMap changes: the model set is live (the daemon re-reads it too), so neither
the model list nor batching nor the log level is part of the pod template. Their command
lines are checked against the real CLI parser in the tests, so a renamed flag breaks a unit
test, not a rollout.
"""

from __future__ import annotations

from typing import Any

from modelcache.operator.spec import SHUTDOWN_DELAY_S, ModelCacheSpec

Manifest = dict[str, Any]

CONFIG_FILE = "config.yaml"
CONFIG_DIR = "/etc/modelcache"
TLS_DIR = "/etc/modelcache-tls"  # the spec.tls Secret, read-only (not under CONFIG_DIR)
DAEMON = "daemon"
FETCH = "fetch"
DOWNLOAD_PREFIX = "download-"  # init containers of operators before the live model set
__all__ = ["SHUTDOWN_DELAY_S"]  # the daemon's env and the pod's grace period use it


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


def fetch_container(spec: ModelCacheSpec) -> Manifest:
    """``modelcache fetch --watch``: every hub model of the config onto the volume, written to
    a temporary directory and renamed into place (the daemon never sees a partial
    checkpoint), one download per revision across replicas sharing the volume. The daemon
    image sets HF_HUB_OFFLINE=1 for serving; this is the one container that goes online."""
    mount = spec.storage.mount_path
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "HF_HUB_OFFLINE", "value": "0"},
        *spec.env,  # e.g. HF_ENDPOINT (a hub mirror), HTTPS_PROXY, a CA bundle
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
    return {
        "name": FETCH,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": [
            "modelcache",
            "fetch",
            "--config",
            f"{CONFIG_DIR}/{CONFIG_FILE}",
            "--to",
            mount,
            "--watch",
        ],
        "env": env,
        "resources": spec.fetch_resources.manifest(),
        "volumeMounts": [
            {"name": "models", "mountPath": mount},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": _SECURE,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def daemon_container(spec: ModelCacheSpec) -> Manifest:
    p = spec.ports
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "TRANSFORMERS_OFFLINE", "value": "1"},
        {"name": "MODELCACHE_SHUTDOWN_DELAY_S", "value": str(SHUTDOWN_DELAY_S)},
        {"name": "MODELCACHE_DRAIN_S", "value": str(spec.drain_seconds)},
        *spec.env,
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
        # HTTP on the metrics port (works with gRPC TLS, on every Kubernetes version).
        # Ready: every configured model is loaded and serving; a loading or failed model
        # keeps the pod out of its Services (and a rollout waits for it).
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "metrics"},
            "periodSeconds": 2,
            "timeoutSeconds": 2,
            "failureThreshold": 2,
        },
        # Live: the event loop and the batch workers make progress (loading is alive).
        "livenessProbe": {
            "httpGet": {"path": "/livez", "port": "metrics"},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        # Imports and file resolution happen before the loop runs.
        "startupProbe": {
            "httpGet": {"path": "/livez", "port": "metrics"},
            "periodSeconds": 2,
            "timeoutSeconds": 2,
            "failureThreshold": max(1, spec.startup_timeout_seconds // 2),
        },
        "resources": spec.resources.manifest(),
        "volumeMounts": mounts,
        "securityContext": _SECURE,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
