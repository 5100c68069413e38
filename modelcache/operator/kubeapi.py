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
PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"
TIMEOUT = (5, 30)  # connect, read: a hung request must not hang a handler forever


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def _method(self, verb: str, kind: str) -> Any:
        group, suffix = _KINDS[kind]
        return getattr(getattr(self, group), f"{verb}_namespaced_{suffix}")

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
