"""Cluster-side helpers for the operator tests: CRDs, namespaces, a ServiceAccount that holds
only the operator's RBAC rules, and "the kubelet" (there is none: tests write pod status).

Everything talks to the local control plane on 127.0.0.1 and nothing else.
"""

from __future__ import annotations

import base64
import datetime
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .cluster import REPO_ROOT, KubeEnv

T = TypeVar("T")
FILES = REPO_ROOT / "deploy" / "helm" / "modelcache" / "files"
GROUP, VERSION, PLURAL = "modelcache.io", "v1alpha1", "modelcaches"
FAKE_POD_IP = "127.0.0.2"  # loopback: even a dial that ignored the override stays local


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 60.0, interval: float = 0.25
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def api_client(kubeconfig: Path) -> client.ApiClient:
    api: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig)
    )
    api.configuration.proxy = None  # 127.0.0.1 only, whatever the environment says
    return api


def kubectl(
    env: KubeEnv, *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(env.kubectl), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env.environ(),
        timeout=120,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
    return result


def install_crds(env: KubeEnv, api: client.ApiClient) -> None:
    kubectl(
        env,
        "apply",
        "-f",
        str(FILES / "crd-modelcaches.yaml"),
        "-f",
        str(FILES / "crd-kopf-peering.yaml"),
    )
    ext = client.ApiextensionsV1Api(api)
    for name in (
        "modelcaches.modelcache.io",
        "kopfpeerings.kopf.dev",
        "clusterkopfpeerings.kopf.dev",
    ):

        def established(name: str = name) -> bool:
            conds = ext.read_custom_resource_definition(name).status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conds)

        wait_for(f"CRD {name} Established", established)
    custom = client.CustomObjectsApi(api)
    wait_for("the ModelCache API to be served", lambda: _served(custom))


def _served(custom: client.CustomObjectsApi) -> bool:
    try:
        custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def create_namespace(api: client.ApiClient, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
    )
    return name


@dataclass(frozen=True)
class Account:
    kubeconfig: Path
    role: str


def operator_account(
    api: client.ApiClient,
    admin_kubeconfig: Path,
    namespace: str,
    out_dir: Path,
    drop: tuple[str, str] | None = None,
) -> Account:
    """A ServiceAccount bound to the operator's ClusterRole rules (minus ``drop``, a
    (resource, verb) pair) and a kubeconfig that authenticates with its token."""
    rules = yaml.safe_load((FILES / "operator-rbac-rules.yaml").read_text())
    if drop is not None:
        for rule in rules:
            if drop[0] in rule["resources"]:
                rule["verbs"] = [v for v in rule["verbs"] if v != drop[1]]
        rules = [r for r in rules if r["verbs"]]
    rbac, core = client.RbacAuthorizationV1Api(api), client.CoreV1Api(api)
    role = f"modelcache-operator-{namespace}"
    rbac.create_cluster_role({"metadata": {"name": role}, "rules": rules})
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "operator"}})
    rbac.create_cluster_role_binding(
        {
            "metadata": {"name": role},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role,
            },
            "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": namespace}],
        }
    )

    def token() -> str | None:
        sa = core.read_namespaced_service_account("operator", namespace)
        if not sa.secrets:
            return None
        secret = core.read_namespaced_secret(sa.secrets[0].name, namespace)
        raw = (secret.data or {}).get("token")
        return base64.b64decode(raw).decode() if raw else None

    admin = yaml.safe_load(admin_kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    kubeconfig = out_dir / f"operator-{namespace}.kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "local", "cluster": cluster}],
                "users": [{"name": "operator", "user": {"token": wait_for("an SA token", token)}}],
                "contexts": [
                    {
                        "name": "operator",
                        "context": {"cluster": "local", "user": "operator", "namespace": namespace},
                    }
                ],
                "current-context": "operator",
            }
        )
    )
    kubeconfig.chmod(0o600)
    return Account(kubeconfig, role)


def delete_account(api: client.ApiClient, account: Account) -> None:
    rbac = client.RbacAuthorizationV1Api(api)
    for delete in (rbac.delete_cluster_role_binding, rbac.delete_cluster_role):
        try:
            delete(account.role)
        except ApiException as exc:
            if exc.status != 404:
                raise


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def kubelet_status(
    pod: dict[str, Any], *, init: str = "done", daemon: str = "ready", message: str = ""
) -> dict[str, Any]:
    """A pod status as a kubelet would write it. init: waiting|running|done|crashloop;
    daemon: waiting|running|ready."""
    spec = pod["spec"]
    now = _now()
    states = {
        "waiting": {"waiting": {"reason": "PodInitializing"}},
        "running": {"running": {"startedAt": now}},
        "done": {
            "terminated": {
                "exitCode": 0,
                "reason": "Completed",
                "startedAt": now,
                "finishedAt": now,
            }
        },
        "crashloop": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
    }
    inits = []
    for c in spec.get("initContainers") or []:
        status = {
            "name": c["name"],
            "image": c["image"],
            "imageID": "",
            "ready": init == "done",
            "restartCount": 0,
            "state": states[init],
        }
        if init == "crashloop":
            status["restartCount"] = 3
            status["lastState"] = {
                "terminated": {
                    "exitCode": 1,
                    "reason": "Error",
                    "message": message,
                    "startedAt": now,
                    "finishedAt": now,
                }
            }
        inits.append(status)
    ready = daemon == "ready"
    daemon_state = states["running"] if daemon in ("running", "ready") else states["waiting"]
    containers = [
        {
            "name": c["name"],
            "image": c["image"],
            "imageID": "",
            "ready": ready,
            "started": daemon != "waiting",
            "restartCount": 0,
            "state": daemon_state,
        }
        for c in spec["containers"]
    ]
    flag = {True: "True", False: "False"}
    conditions = [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
        {"type": "Initialized", "status": flag[init == "done"], "lastTransitionTime": now},
        {"type": "ContainersReady", "status": flag[ready], "lastTransitionTime": now},
        {"type": "Ready", "status": flag[ready], "lastTransitionTime": now},
    ]
    return {
        "phase": "Running" if init == "done" else "Pending",
        "podIP": FAKE_POD_IP,
        "podIPs": [{"ip": FAKE_POD_IP}],
        "hostIP": FAKE_POD_IP,
        "startTime": now,
        "conditions": conditions,
        "initContainerStatuses": inits,
        "containerStatuses": containers,
    }


def play_kubelet(api: client.ApiClient, namespace: str, pod_name: str, **kw: Any) -> None:
    core = client.CoreV1Api(api)
    pod = api.sanitize_for_serialization(core.read_namespaced_pod(pod_name, namespace))
    core.patch_namespaced_pod_status(pod_name, namespace, {"status": kubelet_status(pod, **kw)})


def cache(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        body: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )  # type: ignore[assignment]
        return body
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def events(api: client.ApiClient, namespace: str, name: str) -> list[client.CoreV1Event]:
    items = client.CoreV1Api(api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name},involvedObject.kind=ModelCache"
    )
    return list(items.items)


def pods(api: client.ApiClient, namespace: str, instance: str) -> list[client.V1Pod]:
    return [
        p
        for p in client.CoreV1Api(api)
        .list_namespaced_pod(namespace, label_selector=f"app.kubernetes.io/instance={instance}")
        .items
        if p.metadata.deletion_timestamp is None
    ]


def delete_caches(api: client.ApiClient, namespace: str, timeout: float = 30) -> None:
    """Delete every ModelCache in the namespace while an operator still runs (it releases
    its finalizer); whatever is left after ``timeout`` loses the finalizer by hand, so the
    namespace can be deleted."""
    custom = client.CustomObjectsApi(api)

    def names() -> list[str]:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        return [i["metadata"]["name"] for i in items["items"]]  # type: ignore[index]

    for name in names():
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    try:
        wait_for("the ModelCaches to be deleted", lambda: not names(), timeout)
    except AssertionError:
        for name in names():
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, {"metadata": {"finalizers": None}}
            )
