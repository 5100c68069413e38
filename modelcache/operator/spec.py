"""The ModelCache resource's spec as pydantic models: the operator's input edge.

The API server's OpenAPI schema (deploy/helm/modelcache/files/crd-modelcaches.yaml) rejects
malformed specs and fills in defaults; what it cannot check (unique model names, a GPU
device without a GPU, ``:latest`` images, regexes that do not compile, equal ports) is
checked here, with messages that name the field and say what to change. ``models[]`` and
``batching`` reuse the daemon's own config classes, field names included, so a daemon config's
model list pastes into a ModelCache unchanged and the two can never drift apart.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from modelcache.config import BatchingConfig, ModelSpec

GROUP = "modelcache.io"
VERSION = "v1alpha1"
PLURAL = "modelcaches"
KIND = "ModelCache"
API_VERSION = f"{GROUP}/{VERSION}"
GPU_RESOURCE = "nvidia.com/gpu"
#: Seconds a stopping daemon keeps answering while it leaves its Services' Endpoints.
SHUTDOWN_DELAY_S = 5

# Kubernetes resource.Quantity, as the API server's own OpenAPI schema writes it.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# An image reference that ends in a tag or a digest (":latest" is refused separately).
IMAGE_PATTERN = r"^[^\s@]+(@sha256:[0-9a-f]{64}|:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$"
# The ModelCache name becomes a Service name: a DNS-1035 label, short enough for suffixes.
NAME_PATTERN = r"^[a-z]([-a-z0-9]{0,50}[a-z0-9])?$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class SpecError(ValueError):
    """A spec that the schema accepted but the operator cannot use; says what to fix."""


class _CamelModel(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True
    )


class Ports(_CamelModel):
    grpc: Annotated[int, Field(ge=1, le=65535)] = 50051
    metrics: Annotated[int, Field(ge=1, le=65535)] = 9400


class PvcStorage(_CamelModel):
    size: Annotated[str, Field(pattern=QUANTITY_PATTERN)]
    storage_class_name: str | None = None
    access_modes: tuple[Literal["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany"], ...] = (
        "ReadWriteOnce",
    )


class HostPathStorage(_CamelModel):
    path: Annotated[str, Field(pattern=r"^/")]
    type: Literal["DirectoryOrCreate", "Directory"] = "DirectoryOrCreate"


class EmptyDirStorage(_CamelModel):
    size_limit: Annotated[str | None, Field(pattern=QUANTITY_PATTERN)] = None


class Storage(_CamelModel):
    """Where the model volume comes from: exactly one of the four kinds."""

    mount_path: Annotated[str, Field(pattern=r"^/[^:]*$")] = "/models"
    pvc: PvcStorage | None = None
    existing_claim: Annotated[str | None, Field(pattern=DNS_LABEL_PATTERN)] = None
    host_path: HostPathStorage | None = None
    empty_dir: EmptyDirStorage | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Storage:
        kinds = [
            k
            for k in ("pvc", "existing_claim", "host_path", "empty_dir")
            if getattr(self, k) is not None
        ]
        if len(kinds) != 1:
            raise ValueError(
                "set exactly one of pvc, existingClaim, hostPath, emptyDir "
                f"(got {', '.join(kinds) or 'none'})"
            )
        return self


class Resources(_CamelModel):
    limits: dict[str, int | str] = {}
    requests: dict[str, int | str] = {}

    def manifest(self) -> dict[str, dict[str, str]]:
        """As a container's ``resources``: quantities are strings in the API (the client
        refuses ``nvidia.com/gpu: 1`` as an integer, though the CRD accepts it)."""
        return {
            kind: {name: str(value) for name, value in values.items()}
            for kind, values in (("limits", self.limits), ("requests", self.requests))
            if values
        }

    def gpus(self, resource: str = GPU_RESOURCE) -> int:
        value = self.limits.get(resource, 0)
        return int(value) if str(value).isdigit() else 0


class Toleration(_CamelModel):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class NameRef(_CamelModel):
    name: Annotated[str, Field(min_length=1)]


class SecretKeyRef(_CamelModel):
    name: Annotated[str, Field(min_length=1)]
    key: Annotated[str, Field(min_length=1)] = "token"


class Tls(_CamelModel):
    """TLS on the daemons' gRPC port from a kubernetes.io/tls Secret in the ModelCache's
    namespace: tls.crt / tls.key serve, and with ``client_auth`` the daemons require client
    certificates signed by the Secret's ca.crt (mutual TLS)."""

    secret_name: Annotated[str, Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]
    client_auth: bool = False


class DisruptionBudget(_CamelModel):
    """The PodDisruptionBudget of the daemon pods: a drain or a consolidation evicts at most
    ``max_unavailable`` of them at a time."""

    enabled: bool = True
    max_unavailable: int | str = 1


class ModelCacheSpec(_CamelModel):
    models: Annotated[tuple[ModelSpec, ...], Field(min_length=1, max_length=64)]
    image: Annotated[str, Field(pattern=IMAGE_PATTERN)]
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: tuple[NameRef, ...] = ()
    replicas: Annotated[int, Field(ge=0, le=64)] = 1
    update_strategy: Literal["RollingUpdate", "Recreate"] = "RollingUpdate"
    resources: Resources = Resources()
    node_selector: dict[str, str] = {}
    tolerations: tuple[Toleration, ...] = ()
    affinity: dict[str, Any] | None = None
    service_account_name: Annotated[str | None, Field(pattern=DNS_LABEL_PATTERN)] = None
    storage: Storage = Storage(empty_dir=EmptyDirStorage())
    ports: Ports = Ports()
    batching: BatchingConfig = BatchingConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    fetch_resources: Resources = Resources(
        requests={"cpu": "10m", "memory": "64Mi"}, limits={"memory": "1Gi"}
    )
    hf_token_secret: SecretKeyRef | None = None
    tls: Tls | None = None
    # Scheduling and pod passthrough (GPU clusters: Kueue, Karpenter, RKE2/k3s, MIG, AMD).
    gpu_resource: Annotated[str, Field(pattern=r"^[a-z0-9.-]+/[a-zA-Z0-9._-]+$")] = GPU_RESOURCE
    priority_class_name: Annotated[str | None, Field(pattern=DNS_SUBDOMAIN_PATTERN)] = None
    runtime_class_name: Annotated[str | None, Field(pattern=DNS_SUBDOMAIN_PATTERN)] = None
    # None: spread over nodes (best effort); [] : no spreading; else passed as is.
    topology_spread_constraints: tuple[dict[str, Any], ...] | None = None
    pod_annotations: dict[str, str] = {}
    pod_labels: dict[str, str] = {}
    env: tuple[dict[str, Any], ...] = ()  # core/v1 EnvVar, for the daemon and fetch containers
    termination_grace_period_seconds: Annotated[int, Field(ge=1, le=3600)] = 45
    drain_seconds: Annotated[int, Field(ge=0, le=3000)] = 10
    startup_timeout_seconds: Annotated[int, Field(ge=10, le=86400)] = 600
    pod_disruption_budget: DisruptionBudget = DisruptionBudget()

    @model_validator(mode="before")
    @classmethod
    def _default_devices(cls, data: Any) -> Any:
        """A model without ``device`` runs on the pod's GPUs when it gets some, else on cpu;
        with several GPUs such models are spread over them in order (cuda:0, cuda:1, ...,
        round robin), one daemon per pod either way."""
        if not isinstance(data, dict) or not isinstance(data.get("models"), list):
            return data
        limits = (data.get("resources") or {}).get("limits") or {}
        resource = data.get("gpuResource") or data.get("gpu_resource") or GPU_RESOURCE
        count = str(limits.get(resource, "0"))
        gpus = int(count) if count.isdigit() else 0
        models, spread = [], 0
        for m in data["models"]:
            if isinstance(m, dict) and "device" not in m:
                if gpus == 0:
                    device = "cpu"
                else:
                    device = "cuda" if gpus == 1 else f"cuda:{spread % gpus}"
                    spread += 1
                m = {**m, "device": device}
            models.append(m)
        return {**data, "models": models}

    @model_validator(mode="after")
    def _deeper_checks(self) -> ModelCacheSpec:
        seen: dict[str, int] = {}
        for i, m in enumerate(self.models):
            if m.name in seen:
                raise ValueError(
                    f"models[{i}].name {m.name!r} repeats models[{seen[m.name]}]."
                    "name: model names must be unique"
                )
            seen[m.name] = i
            if m.device.startswith("cuda"):
                gpus = self.resources.gpus(self.gpu_resource)
                index = int(m.device.split(":")[1]) if ":" in m.device else 0
                if index >= gpus:
                    raise ValueError(
                        f"models[{i}].device is {m.device} but resources.limits requests "
                        f"{gpus} {self.gpu_resource}: set "
                        f"resources.limits['{self.gpu_resource}'] to "
                        f"at least {index + 1}, or set device: cpu"
                    )
        if self.image.endswith(":latest"):
            raise ValueError(
                f"image {self.image!r} uses the moving tag 'latest': pin a version "
                "tag or a digest (@sha256:...) so every replica runs the same code"
            )
        self._storage_fits()
        needed = SHUTDOWN_DELAY_S + self.drain_seconds + 5
        if self.termination_grace_period_seconds < needed:
            raise ValueError(
                f"terminationGracePeriodSeconds is {self.termination_grace_period_seconds} but a "
                f"stopping daemon needs {SHUTDOWN_DELAY_S} s to leave the Endpoints, "
                f"drainSeconds ({self.drain_seconds}) to answer what it admitted and 5 s to "
                f"exit: set it to at least {needed}, or lower drainSeconds"
            )
        if self.ports.grpc == self.ports.metrics:
            raise ValueError(
                f"ports.grpc and ports.metrics are both {self.ports.grpc}: they must differ"
            )
        return self

    def _storage_fits(self) -> None:
        """Storage the pods cannot use as asked: refused, saying what to use instead."""
        pvc = self.storage.pvc
        if pvc is None:
            return
        modes = set(pvc.access_modes)
        if modes == {"ReadWriteOnce"} and self.replicas > 1:
            raise ValueError(
                f"storage.pvc.accessModes is [ReadWriteOnce] with replicas {self.replicas}: "
                "one node mounts such a volume, so the other replicas would wait in "
                "Multi-Attach. Use accessModes [ReadWriteMany] (a shared cache, one download "
                "per model), or emptyDir/hostPath (a copy per pod or node), or replicas 1"
            )
        hub = [m.name for m in self.models if m.is_hub_id]
        if modes == {"ReadOnlyMany"} and hub:
            raise ValueError(
                f"storage.pvc.accessModes is [ReadOnlyMany] but models {', '.join(hub)} come "
                "from the hub and must be downloaded onto the volume: use ReadWriteMany, or "
                "put the models on the volume beforehand and give local sources"
            )

    @property
    def writable_storage(self) -> bool:
        """Whether the pods may write the model volume (the fetch container does)."""
        pvc = self.storage.pvc
        return pvc is None or set(pvc.access_modes) != {"ReadOnlyMany"}

    @property
    def single_node_volume(self) -> bool:
        """A ReadWriteOnce claim: every pod of a rollout must run on its node."""
        pvc = self.storage.pvc
        return pvc is not None and set(pvc.access_modes) == {"ReadWriteOnce"}


def _loc(loc: tuple[int | str, ...]) -> str:
    out = "spec"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


_INHERITED = ("image", "imagePullSecrets", "tolerations", "nodeSelector", "priorityClassName")


def with_defaults(spec: Any, defaults: dict[str, Any]) -> Any:
    """The spec with the operator's chart-wide defaults filled in where it leaves a field out
    (never over a value it sets); ``storageClassName`` goes to a ``storage.pvc`` without one."""
    if not isinstance(spec, dict) or not defaults:
        return spec
    out = dict(spec)
    for key in _INHERITED:
        if key in defaults and key not in out:
            out[key] = defaults[key]
    storage = out.get("storage")
    klass = defaults.get("storageClassName")
    pvc = storage.get("pvc") if isinstance(storage, dict) else None
    if (
        klass
        and isinstance(storage, dict)
        and isinstance(pvc, dict)
        and "storageClassName" not in pvc
    ):
        out["storage"] = {**storage, "pvc": {**pvc, "storageClassName": klass}}
    return out


def parse_spec(name: str, spec: object) -> ModelCacheSpec:
    """Validate a ModelCache's name and spec; SpecError lists every problem, one a line."""
    problems = []
    if not re.match(NAME_PATTERN, name):
        problems.append(
            f"metadata.name {name!r}: must be a DNS-1035 label of at most 52 "
            "characters (lower-case letters, digits, '-'; starting with a letter)"
        )
    try:
        parsed = ModelCacheSpec.model_validate(spec)
    except ValidationError as exc:
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["loc"] == ("image",) and err["type"] == "missing":
                msg = "no image: set spec.image, or the chart's daemon.image as the default"
            if err["loc"]:
                problems.append(f"{_loc(tuple(err['loc']))}: {msg}")
            else:  # a cross-field check: the message starts with the field's path
                problems.append(f"spec.{msg}")
        raise SpecError("\n".join(problems)) from None
    if problems:
        raise SpecError("\n".join(problems))
    return parsed
