"""The few Kubernetes API calls the operator makes, returning plain JSON dicts.

Responses are read raw (``_preload_content=False``) and parsed as JSON, so the rest of the
operator sees the same camelCase dicts kopf hands to handlers, never the client's model
classes. kopf itself does the watching, the CR patching (status, finalizers) and the Events.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

Manifest = dict[str, Any]

# kind -> (API group attribute, method suffix); methods are read_/create_/replace_namespaced_*
_KINDS = {
    "ConfigMap": ("core", "config_map"),
    "Service": ("core", "service"),
    "PersistentVolumeClaim": ("core", "persistent_volume_claim"),
    "Deployment": ("apps", "deployment"),
}
# Kinds whose API version depends on the cluster: written through plain REST paths at the
# version the API server offers (policy/v1 from Kubernetes 1.21, policy/v1beta1 before).
_REST_KINDS = {"PodDisruptionBudget": ("policy", ("v1", "v1beta1"), "poddisruptionbudgets")}
PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"
TIMEOUT = (5, 30)  # connect, read: a hung request must not hang a handler forever


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self._versions: dict[str, str] = {}
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def _method(self, verb: str, kind: str) -> Any:
        if kind in _REST_KINDS:
            return lambda *args, **kw: self._rest(verb, kind, *args, **kw)
        group, suffix = _KINDS[kind]
        return getattr(getattr(self, group), f"{verb}_namespaced_{suffix}")

    def _call(
        self, method: str, path: str, body: Manifest | None = None, query: list[Any] | None = None
    ) -> Any:
        """One REST call with the client's credentials; raises ApiException like the typed
        methods. Returns the response (``.data`` holds the JSON bytes)."""
        method, url, headers, payload, _ = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params={"Content-Type": "application/json", "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(
            method, url, header_params=headers, body=payload, _request_timeout=TIMEOUT
        )
        response.read()  # type: ignore[no-untyped-call]
        if not 200 <= response.status < 300:
            raise ApiException(
                status=response.status,
                reason=response.reason,
                body=bytes(response.data or b"").decode(),
            )
        return response

    def _version(self, kind: str) -> str:
        """The newest version of ``kind``'s group that the API server serves (cached)."""
        if kind not in self._versions:
            group, known, _ = _REST_KINDS[kind]
            served = {
                v["version"] for v in self._json(self._call("GET", f"/apis/{group}"))["versions"]
            }
            self._versions[kind] = next((v for v in known if v in served), known[0])
        return self._versions[kind]

    def _rest(self, verb: str, kind: str, *args: Any, **kw: Any) -> Any:
        """read(name, ns) / create(ns, body) / replace(name, ns, body) over REST."""
        group, _, plural = _REST_KINDS[kind]
        version = self._version(kind)
        base = f"/apis/{group}/{version}/namespaces"
        body = None
        if verb == "create":
            namespace, body = args
            path, method = f"{base}/{namespace}/{plural}", "POST"
        else:
            name, namespace = args[0], args[1]
            body = args[2] if verb == "replace" else None
            path = f"{base}/{namespace}/{plural}/{name}"
            method = "PUT" if verb == "replace" else "GET"
        if body is not None:
            body = {**body, "apiVersion": f"{group}/{version}"}
        query = [("dryRun", kw["dry_run"])] if kw.get("dry_run") else []
        return self._call(method, path, body, query)

    @staticmethod
    def _json(response: Any) -> Manifest:
        data: Manifest = json.loads(response.data)
        return data

    def read(self, kind: str, namespace: str, name: str) -> Manifest | None:
        try:
            return self._json(
                self._method("read", kind)(
                    name, namespace, _preload_content=False, _request_timeout=TIMEOUT
                )
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, body: Manifest, dry_run: bool = False) -> Manifest:
        meta = body["metadata"]
        extra = {"dry_run": "All"} if dry_run else {}
        return self._json(
            self._method("create", body["kind"])(
                meta["namespace"], body, _preload_content=False, _request_timeout=TIMEOUT, **extra
            )
        )

    def replace(self, body: Manifest, dry_run: bool = False) -> Manifest:
        meta = body["metadata"]
        extra = {"dry_run": "All"} if dry_run else {}
        return self._json(
            self._method("replace", body["kind"])(
                meta["name"],
                meta["namespace"],
                body,
                _preload_content=False,
                _request_timeout=TIMEOUT,
                **extra,
            )
        )

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """A Secret's decoded data (None if it does not exist); only spec.tls's Secret is
        ever read, by name (RBAC: get on secrets, no list or watch)."""
        try:
            secret = self._json(
                self.core.read_namespaced_secret(
                    name, namespace, _preload_content=False, _request_timeout=TIMEOUT
                )
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}

    def list_pods(self, namespace: str, labels: Mapping[str, str]) -> list[Manifest]:
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        items: list[Manifest] = self._json(
            self.core.list_namespaced_pod(
                namespace, label_selector=selector, _preload_content=False, _request_timeout=TIMEOUT
            )
        )["items"]
        return items

    def pod_warnings(self, namespace: str, pods: set[str]) -> dict[str, tuple[str, str]]:
        """The newest Warning Event (reason, message) of each of ``pods`` that has one: why a
        pod is stuck (FailedScheduling, FailedMount, FailedCreatePodSandBox ...)."""
        events = self._json(
            self.core.list_namespaced_event(
                namespace,
                field_selector="involvedObject.kind=Pod,type=Warning",
                _preload_content=False,
                _request_timeout=TIMEOUT,
            )
        )["items"]
        newest: dict[str, tuple[str, str, str]] = {}
        for e in events:
            pod = (e.get("involvedObject") or {}).get("name", "")
            when = e.get("lastTimestamp") or e.get("eventTime") or ""
            if pod in pods and when >= newest.get(pod, ("", "", ""))[0]:
                newest[pod] = (when, e.get("reason", ""), e.get("message", ""))
        return {pod: (reason, message) for pod, (_, reason, message) in newest.items()}

    def ensure_peering(self, name: str, namespace: str | None) -> bool:
        """Create the kopf peering object (KopfPeering in a namespace, ClusterKopfPeering
        without one) unless it exists; kopf waits for it before handling anything."""
        body: Manifest = {
            "apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}",
            "metadata": {"name": name},
        }
        try:
            if namespace is None:
                body["kind"] = "ClusterKopfPeering"
                self.custom.create_cluster_custom_object(
                    PEERING_GROUP,
                    PEERING_VERSION,
                    "clusterkopfpeerings",
                    body,
                    _request_timeout=TIMEOUT,
                )
            else:
                body["kind"] = "KopfPeering"
                self.custom.create_namespaced_custom_object(
                    PEERING_GROUP,
                    PEERING_VERSION,
                    namespace,
                    "kopfpeerings",
                    body,
                    _request_timeout=TIMEOUT,
                )
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True
