"""The local control plane of hack/kube-control-plane.sh really behaves like Kubernetes."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .cluster import KubeEnv

pytestmark = pytest.mark.kube

T = TypeVar("T")

GROUP = "ctltest.modelcache.dev"
PLURAL = "widgets"


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture
def api(kube_env: KubeEnv) -> Iterator[client.ApiClient]:
    api_client: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(kube_env.kubeconfig)
    )
    try:
        yield api_client
    finally:
        api_client.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def namespace(api: client.ApiClient) -> Iterator[str]:
    core = client.CoreV1Api(api)
    name = f"ctltest-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core.delete_namespace(name)


def _deployment(name: str, replicas: int) -> client.V1Deployment:
    labels = {"app": name}
    return client.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    # Never pulled: there is no kubelet, pods are created but never run.
                    containers=[client.V1Container(name="main", image="example.invalid/none:0")]
                ),
            ),
        ),
    )


def test_deployment_replicaset_pods_and_garbage_collection(
    api: client.ApiClient, namespace: str
) -> None:
    apps = client.AppsV1Api(api)
    core = client.CoreV1Api(api)

    dep = apps.create_namespaced_deployment(namespace, _deployment("web", replicas=2))
    assert dep.metadata is not None and dep.metadata.uid
    dep_uid = dep.metadata.uid

    def owned_replicasets() -> list[client.V1ReplicaSet]:
        items = apps.list_namespaced_replica_set(namespace).items
        return [
            rs
            for rs in items
            if rs.metadata is not None
            and any(o.uid == dep_uid for o in rs.metadata.owner_references or [])
        ]

    rs = wait_for("a ReplicaSet owned by the Deployment", owned_replicasets)[0]
    assert rs.metadata is not None and rs.metadata.uid and rs.metadata.name
    rs_uid, rs_name = rs.metadata.uid, rs.metadata.name

    def owned_pods() -> list[client.V1Pod] | None:
        pods = [
            p
            for p in core.list_namespaced_pod(namespace).items
            if p.metadata is not None
            and any(o.uid == rs_uid for o in p.metadata.owner_references or [])
        ]
        return pods if len(pods) == 2 else None

    # Pods need the namespace's default ServiceAccount (and its token) to pass admission,
    # so this also proves the serviceaccount + token controllers work.
    pods = wait_for("2 Pods owned by the ReplicaSet", owned_pods)
    for pod in pods:
        assert pod.spec is not None and pod.status is not None
        assert pod.spec.service_account_name == "default"
        assert pod.status.phase == "Pending"  # no scheduler, no kubelet
        assert not pod.spec.node_name

    apps.delete_namespaced_deployment(
        "web", namespace, body=client.V1DeleteOptions(propagation_policy="Background")
    )

    def replicaset_gone() -> bool:
        try:
            apps.read_namespaced_replica_set(rs_name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    wait_for("the garbage collector to delete the ReplicaSet", replicaset_gone)
    wait_for(
        "the garbage collector to delete the Pods",
        lambda: (
            not any(
                p.metadata is not None and p.metadata.deletion_timestamp is None
                for p in core.list_namespaced_pod(namespace).items
            )
        ),
    )


def _crd() -> client.V1CustomResourceDefinition:
    schema = client.V1JSONSchemaProps(
        type="object",
        properties={
            "spec": client.V1JSONSchemaProps(
                type="object",
                properties={"size": client.V1JSONSchemaProps(type="integer")},
            ),
            "status": client.V1JSONSchemaProps(
                type="object",
                x_kubernetes_preserve_unknown_fields=True,
            ),
        },
    )
    return client.V1CustomResourceDefinition(
        api_version="apiextensions.k8s.io/v1",
        kind="CustomResourceDefinition",
        metadata=client.V1ObjectMeta(name=f"{PLURAL}.{GROUP}"),
        spec=client.V1CustomResourceDefinitionSpec(
            group=GROUP,
            scope="Namespaced",
            names=client.V1CustomResourceDefinitionNames(
                plural=PLURAL, singular="widget", kind="Widget", list_kind="WidgetList"
            ),
            versions=[
                client.V1CustomResourceDefinitionVersion(
                    name="v1",
                    served=True,
                    storage=True,
                    schema=client.V1CustomResourceValidation(open_apiv3_schema=schema),
                    subresources=client.V1CustomResourceSubresources(status={}),
                )
            ],
        ),
    )


def test_custom_resource_with_status_subresource(api: client.ApiClient, namespace: str) -> None:
    ext = client.ApiextensionsV1Api(api)
    custom = client.CustomObjectsApi(api)
    crd_name = f"{PLURAL}.{GROUP}"
    try:
        ext.create_custom_resource_definition(_crd())
    except ApiException as exc:
        if exc.status != 409:  # left over from an earlier run on the same etcd data
            raise

    def established() -> bool:
        crd = ext.read_custom_resource_definition(crd_name)
        conditions = (crd.status.conditions if crd.status else None) or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    wait_for("the CRD to be Established", established)

    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Widget",
        "metadata": {"name": "w1"},
        "spec": {"size": 3},
    }
    # The first write of a custom object is where the old vendored reflect2 crashed.
    created = wait_for(
        "the Widget resource to be served",
        lambda: _try_create(custom, namespace, body),
    )
    assert created["spec"] == {"size": 3}
    assert "status" not in created

    # With the status subresource, status is written only through /status ...
    patched: dict[str, Any] = custom.patch_namespaced_custom_object_status(  # type: ignore[assignment]
        GROUP,
        "v1",
        namespace,
        PLURAL,
        "w1",
        {"status": {"phase": "Ready", "observed": 1}, "spec": {"size": 99}},
    )
    assert patched["status"] == {"phase": "Ready", "observed": 1}
    assert patched["spec"] == {"size": 3}  # spec changes through /status are ignored

    # ... and status changes through the main resource are ignored.
    patched = custom.patch_namespaced_custom_object(  # type: ignore[assignment]
        GROUP, "v1", namespace, PLURAL, "w1", {"spec": {"size": 4}, "status": {"phase": "X"}}
    )
    assert patched["spec"] == {"size": 4}
    assert patched["status"] == {"phase": "Ready", "observed": 1}

    got: dict[str, Any] = custom.get_namespaced_custom_object(  # type: ignore[assignment]
        GROUP, "v1", namespace, PLURAL, "w1"
    )
    assert got["status"]["phase"] == "Ready"
    assert got["metadata"]["generation"] == 2  # status writes do not bump generation

    custom.delete_namespaced_custom_object(GROUP, "v1", namespace, PLURAL, "w1")


def _try_create(
    custom: client.CustomObjectsApi, namespace: str, body: dict[str, Any]
) -> dict[str, Any] | None:
    try:
        result: dict[str, Any] = custom.create_namespaced_custom_object(  # type: ignore[assignment]
            GROUP, "v1", namespace, PLURAL, body
        )
        return result
    except ApiException as exc:
        if exc.status == 404:  # CRD established but the endpoint not served yet
            return None
        raise


def test_kubectl_and_helm(kube_env: KubeEnv, namespace: str) -> None:
    def run(*args: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            args,
            input=stdin,
            capture_output=True,
            text=True,
            env=kube_env.environ(),
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"{args}: {result.stderr}"
        return result.stdout

    manifest = json.dumps(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "cm1", "namespace": namespace},
            "data": {"k": "v"},
        }
    )
    assert "created" in run(str(kube_env.kubectl), "apply", "-f", "-", stdin=manifest)
    got = json.loads(
        run(str(kube_env.kubectl), "get", "configmap", "cm1", "-n", namespace, "-o", "json")
    )
    assert got["data"] == {"k": "v"}
    nodes = run(str(kube_env.kubectl), "get", "nodes", "-o", "name")
    assert nodes.strip() == ""
    run(str(kube_env.helm), "list", "-n", namespace)
