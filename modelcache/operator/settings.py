"""The operator's own settings, from the environment (prefix ``MODELCACHE_OPERATOR_``).

What a cache is lives in the ModelCache resource; how the operator process runs (probe
timeouts, status interval, peering, ports) lives here, in one place, so the Helm chart sets
it through env and a test can point the operator at a local daemon without code changes.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_identity() -> str:
    """POD_NAME inside a cluster (set by the chart), host-pid outside: unique per process."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELCACHE_OPERATOR_", extra="ignore")

    # --- status probing -----------------------------------------------------------
    # Seconds between status refreshes of each ModelCache (Deployment, Pods, ListModels).
    status_interval: Annotated[float, Field(gt=0, le=3600)] = 10.0
    # Deadline of one ListModels call to one pod.
    probe_timeout: Annotated[float, Field(gt=0, le=60)] = 3.0
    # host:port that replaces every pod's podIP:grpcPort when dialing ListModels. For tests
    # and local development only (a daemon on loopback); never set it in a cluster.
    daemon_address_override: str | None = None
    # Used to build status.endpoint (dns:///NAME.NS.svc.DOMAIN:PORT).
    cluster_domain: str = "cluster.local"
    # Chart-wide defaults (JSON) for fields a ModelCache spec leaves out: image,
    # imagePullSecrets, tolerations, nodeSelector, priorityClassName, storageClassName.
    daemon_defaults: dict[str, Any] = {}

    # --- peering: one active operator among replicas -----------------------------
    peering_name: str = "modelcache-operator"
    # None: the oldest replica wins (priority from its start time), so a new replica
    # never takes over from a running one. Set it to force an order.
    peering_priority: int | None = None
    # Seconds after which a silent (crashed) replica is considered gone.
    peering_lifetime: Annotated[int, Field(ge=5, le=3600)] = 60

    # --- the operator's own endpoints ---------------------------------------------
    liveness_host: str = "0.0.0.0"  # a pod probe endpoint
    liveness_port: Annotated[int, Field(ge=0, le=65535)] = 8081  # 0: no liveness endpoint
    metrics_host: str = "0.0.0.0"  # scraped by Prometheus
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 8080  # 0: no metrics endpoint

    # Reported as the Events' reportingInstance and the peering identity; empty: POD_NAME,
    # else host-pid.
    identity: Annotated[str, Field(validate_default=True)] = ""

    # Testing only: exit the process (as a crash would) right after applying this child
    # kind (ConfigMap, PersistentVolumeClaim, Service, Deployment) during a reconcile.
    fault_exit_after: str | None = None

    @field_validator("daemon_defaults", mode="before")
    @classmethod
    def _json_defaults(cls, value: Any) -> Any:
        """JSON text (the chart's env var) or a mapping."""
        if isinstance(value, str):
            return json.loads(value) if value.strip() else {}
        return value

    @field_validator("identity")
    @classmethod
    def _identity(cls, value: str) -> str:
        return value or default_identity()

    def liveness_endpoint(self) -> str | None:
        if self.liveness_port == 0:
            return None
        return f"http://{self.liveness_host}:{self.liveness_port}/healthz"
