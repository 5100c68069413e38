"""Fixtures and helpers shared by the operator's control-plane tests: the admin client with
the CRDs installed, a namespace per test, a ServiceAccount holding only the operator's RBAC
rules, operator subprocesses (each checked for permission errors), tiny checkpoints, and
ModelCache manifests."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tiny_models
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .cluster import PROCESS_LOGS, KubeEnv
from .operator_cluster import (
    GROUP,
    VERSION,
    Account,
    api_client,
    cache,
    create_namespace,
    delete_account,
    delete_caches,
    install_crds,
    kubectl,
    operator_account,
    wait_for,
)
from .operator_procs import Operator

SHA = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
HUB_ID = "acme/tiny-bert"


@pytest.fixture(name="admin", scope="module")
def fixture_admin(kube_env: KubeEnv) -> Iterator[client.ApiClient]:
    api = api_client(kube_env.kubeconfig)
    install_crds(kube_env, api)
    yield api
    api.close()  # type: ignore[no-untyped-call]


@pytest.fixture(name="ns")
def fixture_ns(admin: client.ApiClient) -> Iterator[str]:
    name = create_namespace(admin, "mc")
    yield name
    client.CoreV1Api(admin).delete_namespace(name)


@pytest.fixture(name="account")
def fixture_account(
    admin: client.ApiClient, kube_env: KubeEnv, ns: str, tmp_path: Path
) -> Iterator[Account]:
    acc = operator_account(admin, kube_env.kubeconfig, ns, tmp_path)
    yield acc
    delete_account(admin, acc)


@pytest.fixture(name="start_operator")
def fixture_start_operator(
    admin: client.ApiClient,
    account: Account,
    ns: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., Operator]]:
    """Start operator subprocesses (real kill/restart); every one must never hit a 403."""
    started: list[Operator] = []
    logs = request.node.stash.setdefault(PROCESS_LOGS, [])

    def start(identity: str = "op-a", daemon_port: int = 1, **settings: str) -> Operator:
        op = Operator(
            account.kubeconfig,
            ns,
            tmp_path / f"{identity}.log",
            identity=identity,
            daemon_port=daemon_port,
            **settings,
        )
        started.append(op)
        logs.append(op.log_path)
        return op

    yield start
    alive = any(op.proc.poll() is None for op in started)
    delete_caches(admin, ns, timeout=30 if alive else 0)
    for op in started:
        op.stop()
    for op in started:
        op.assert_no_permission_errors()


@pytest.fixture(name="checkpoints", scope="module")
def fixture_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    good = tiny_models.bert(root / "tiny-bert")
    broken = root / "broken"
    shutil.copytree(good, broken)
    (broken / "model.safetensors").unlink()  # config and tokenizer, no weights
    return {"good": good, "broken": broken}


def modelcache(
    name: str, volume: Path, models: list[dict[str, Any]], **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelCache",
        "metadata": {"name": name},
        "spec": {
            "image": "registry.invalid/modelcache:0.1.0",
            "models": models,
            # a shared (ReadWriteMany) volume: any number of replicas may mount it
            "storage": {
                "mountPath": str(volume),
                "pvc": {"size": "1Gi", "accessModes": ["ReadWriteMany"]},
            },
            "resources": {"requests": {"cpu": "100m"}},
            **spec,
        },
    }


GOOD = {"name": "good", "source": HUB_ID, "revision": SHA, "task": "embedding"}
BROKEN = {"name": "broken", "source": "broken", "task": "embedding"}


def apply(env: KubeEnv, ns: str, body: dict[str, Any]) -> None:
    kubectl(env, "apply", "-n", ns, "-f", "-", stdin=json.dumps(body))


def status_of(
    admin: client.ApiClient,
    ns: str,
    name: str,
    check: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = 60,
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        body = cache(admin, ns, name) or {}
        status = body.get("status") or {}
        return status if status and check(status) else None

    try:
        return wait_for(what, probe, timeout)
    except AssertionError:
        now = json.dumps((cache(admin, ns, name) or {}).get("status"))
        raise AssertionError(f"{what}; status now: {now}") from None


def children(admin: client.ApiClient, ns: str, name: str) -> dict[str, Any]:
    """The children that exist, by kind (None where missing)."""
    core, apps = client.CoreV1Api(admin), client.AppsV1Api(admin)
    reads = {
        "ConfigMap": lambda: core.read_namespaced_config_map(f"{name}-config", ns),
        "PersistentVolumeClaim": lambda: core.read_namespaced_persistent_volume_claim(
            f"{name}-models", ns
        ),
        "Service": lambda: core.read_namespaced_service(name, ns),
        "ClusterIPService": lambda: core.read_namespaced_service(f"{name}-clusterip", ns),
        "Deployment": lambda: apps.read_namespaced_deployment(name, ns),
    }
    out: dict[str, Any] = {}
    for kind, read in reads.items():
        try:
            out[kind] = read()
        except ApiException as exc:
            if exc.status != 404:
                raise
            out[kind] = None
    return out
