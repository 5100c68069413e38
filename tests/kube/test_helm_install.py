"""The chart on a real control plane (hack/kube-control-plane.sh: kube-apiserver +
controller-manager v1.20, no kubelet): `helm install`, `helm upgrade`, `helm uninstall` with a
real helm v3, and the operator run with ONLY the chart's RBAC — the token of the chart's
ServiceAccount, the command, arguments and environment of the chart's Deployment — through
a full reconcile (create, update, timer refresh, delete). A permission missing from the
chart fails the reconcile, and so this test (test_a_missing_permission_fails_the_reconcile
shows it does).

No pods run here, so helm never --waits, and the operator process (the one the chart's
Deployment would start) runs on this machine against 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from monitoring.tools import (
    CHART,
    alert_rules,
    dashboard,
    dashboard_targets,
    exposition_names,
    free_port,
    grafana_to_promql,
    http_get,
    promql_metric_names,
    rendered_rules,
    tool,
)

from .cluster import KubeEnv

pytestmark = pytest.mark.kube

T = TypeVar("T")
SUFFIX = uuid.uuid4().hex[:6]
RELEASE = f"mc-{SUFFIX}"
NAMESPACE = f"mc-helm-{SUFFIX}"  # the release's namespace
PEERING = f"modelcache-helm-{SUFFIX}"  # cluster-scoped: unique per run
CRDS = ("modelcaches.modelcache.io", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev")
MONITORING_KINDS = {
    "servicemonitors": "ServiceMonitor",
    "podmonitors": "PodMonitor",
    "prometheusrules": "PrometheusRule",
}
_PROXY_VARS = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "grpc_proxy",
    "GRPC_PROXY",
)


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout: float = 60,
    fail_fast: Callable[[], None] | None = None,
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        if fail_fast is not None:
            fail_fast()
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.25)


@dataclass
class Kube:
    env: KubeEnv
    values: dict[str, Any] = field(default_factory=dict)

    def run(
        self, tool: Path, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(tool), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env.environ(),
            timeout=180,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{tool.name} {' '.join(args)}: {proc.stderr}{proc.stdout}")
        return proc

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run(self.env.kubectl, *args, stdin=stdin, check=check)

    def get(self, *args: str) -> dict[str, Any] | None:
        proc = self.kubectl("get", *args, "-o", "json", check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr or "not found" in proc.stderr:
                return None
            raise AssertionError(proc.stderr)
        data: dict[str, Any] = json.loads(proc.stdout)
        return data

    def helm(self, *args: str, values: dict[str, Any] | None = None) -> str:
        extra = ["--values", "-"] if values is not None else []
        proc = self.run(
            self.env.helm,
            *args,
            *extra,
            stdin=yaml.safe_dump(values) if values is not None else None,
        )
        return proc.stdout

    def manifest(self) -> list[dict[str, Any]]:
        out = self.helm("get", "manifest", RELEASE, "-n", NAMESPACE)
        return [d for d in yaml.safe_load_all(out) if d]

    def deployment(self) -> dict[str, Any]:
        (d,) = [d for d in self.manifest() if d["kind"] == "Deployment"]
        return d


def base_values(metrics_port: int, health_port: int, **operator: Any) -> dict[str, Any]:
    return {
        "operator": {
            "peeringName": PEERING,
            "statusInterval": 1,
            "probeTimeout": 1,
            "metricsPort": metrics_port,
            "healthPort": health_port,
            **operator,
        }
    }


@pytest.fixture(scope="module")
def kube(kube_env: KubeEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    k = Kube(kube_env)
    # The CRDs may exist already (another test applied them with kubectl): let this release
    # adopt them, as `helm install` refuses objects it does not own.
    for crd in CRDS:
        if k.get("crd", crd) is not None:
            k.kubectl("label", "crd", crd, "--overwrite", "app.kubernetes.io/managed-by=Helm")
            k.kubectl(
                "annotate",
                "crd",
                crd,
                "--overwrite",
                f"meta.helm.sh/release-name={RELEASE}",
                f"meta.helm.sh/release-namespace={NAMESPACE}",
            )
    # prometheus-operator's CRDs, reduced to their names (no schema): the control plane has
    # no Prometheus operator, but the chart's monitoring objects must be accepted. They stay
    # (deleting and re-creating them would leave helm's discovery cache stale).
    for plural, kind in MONITORING_KINDS.items():
        name = f"{plural}.monitoring.coreos.com"
        if k.get("crd", name) is None:
            k.kubectl("apply", "-f", "-", stdin=json.dumps(_stub_crd(plural, kind)))
        k.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    # Refresh the discovery cache helm shares with kubectl (~/.kube/cache).
    served = k.kubectl("api-resources", "--api-group=monitoring.coreos.com", "-o", "name")
    assert len(served.stdout.split()) == len(MONITORING_KINDS), served.stdout
    yield k
    k.run(kube_env.helm, "uninstall", RELEASE, "-n", NAMESPACE, check=False)
    for ns in (NAMESPACE, f"{NAMESPACE}-a", f"{NAMESPACE}-b"):
        k.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
    k.kubectl("delete", "clusterkopfpeering", PEERING, "--ignore-not-found", check=False)


def _stub_crd(plural: str, kind: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


# ----------------------------------------------------------------------------- the operator
def sa_kubeconfig(k: Kube, namespace: str, account: str, out: Path) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount (its token Secret, which
    Kubernetes 1.20's token controller creates), and nothing else."""

    def token() -> str | None:
        sa = k.get("serviceaccount", account, "-n", namespace) or {}
        for ref in sa.get("secrets") or []:
            secret = k.get("secret", ref["name"], "-n", namespace) or {}
            raw = (secret.get("data") or {}).get("token")
            if raw:
                return base64.b64decode(raw).decode()
        return None

    admin = yaml.safe_load(k.env.kubeconfig.read_text())
    out.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "local", "cluster": admin["clusters"][0]["cluster"]}],
                "users": [{"name": account, "user": {"token": wait_for("the SA token", token)}}],
                "contexts": [{"name": "sa", "context": {"cluster": "local", "user": account}}],
                "current-context": "sa",
            }
        )
    )
    out.chmod(0o600)
    return out


class ChartOperator:
    """The process the chart's Deployment describes: its command and arguments, its
    environment (POD_NAME from the downward API set by hand), authenticated as its
    ServiceAccount. Only the listening host is changed to 127.0.0.1."""

    def __init__(
        self, deployment: dict[str, Any], kubeconfig: Path, log: Path, identity: str
    ) -> None:
        pod = deployment["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["command"][0] == "python"
        cmd = [sys.executable, *c["command"][1:], *c.get("args", [])]
        env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
        for e in c["env"]:
            if "value" in e:
                env[e["name"]] = e["value"]
            elif e["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name":
                env[e["name"]] = identity
            else:
                raise AssertionError(f"unexpected env source {e}")
        env.update(
            KUBECONFIG=str(kubeconfig),
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
            MODELCACHE_OPERATOR_METRICS_HOST="127.0.0.1",
            MODELCACHE_OPERATOR_LIVENESS_HOST="127.0.0.1",
        )
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        self.metrics_port, self.health_port = ports["metrics"], ports["health"]
        self.health_path = c["livenessProbe"]["httpGet"]["path"]
        self.identity = identity
        self.log = log
        self._out = log.open("ab")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def healthy(self) -> bool:
        try:
            http_get(f"http://127.0.0.1:{self.health_port}{self.health_path}")
            return True
        except OSError:
            return False

    def permission_errors(self) -> list[str]:
        """Log lines where the API server denied the operator by RBAC (`... is forbidden:
        User "system:serviceaccount:..." cannot VERB resource ...`) or where kopf found it
        lacks a permission. Other 403s (creating in a namespace being deleted, on a shared
        control plane) are not about the chart's rules."""
        return [
            line
            for line in self.text().splitlines()
            if re.search(r"cannot \w+ resource|Not enough permissions", line)
        ]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited {self.proc.returncode}:\n{self.text()[-4000:]}")
        bad = self.permission_errors()
        if bad:
            raise AssertionError("operator hit a permission error:\n" + "\n".join(bad[:5]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()


def modelcache(name: str, replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "modelcache.io/v1alpha1",
        "kind": "ModelCache",
        "metadata": {"name": name},
        "spec": {
            "image": "registry.invalid/modelcache:0.1.0",
            "replicas": replicas,
            "models": [
                {"name": "minilm", "source": "minilm", "task": "embedding", "device": "cpu"}
            ],
            "storage": {"pvc": {"size": "1Gi", "accessModes": ["ReadWriteMany"]}},
            "resources": {"requests": {"cpu": "100m"}},
        },
    }


def full_reconcile(k: Kube, op: ChartOperator, namespace: str, name: str = "emb") -> None:
    """Create, update, refresh and delete a ModelCache; every step must go through."""
    alive = op.check_alive
    wait_for("the operator's liveness endpoint", op.healthy, 60, alive)
    k.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(modelcache(name)))
    children = {
        "configmap": f"{name}-config",
        "persistentvolumeclaim": f"{name}-models",
        "service": name,
        "deployment": name,
    }
    for kind, child in children.items():
        obj = wait_for(
            f"{kind} {child}",
            lambda kind=kind, child=child: k.get(kind, child, "-n", namespace),
            60,
            alive,
        )
        assert obj["metadata"]["ownerReferences"][0]["name"] == name

    def status() -> dict[str, Any] | None:
        body = k.get("modelcache", name, "-n", namespace) or {}
        st = body.get("status") or {}
        done = st.get("phase") and st.get("observedGeneration") == body["metadata"]["generation"]
        return st if done else None

    st = wait_for("status with phase and observedGeneration", status, 60, alive)
    assert st["phase"] in {"Pending", "Downloading", "Loading"}, st  # no kubelet: no pod runs

    def my_event() -> bool:
        events = (k.get("events", "-n", namespace) or {}).get("items", [])
        return any(
            e["involvedObject"].get("name") == name and op.identity in json.dumps(e) for e in events
        )

    wait_for(f"an Event posted by {op.identity}", my_event, 60, alive)
    # Update: the children follow the spec.
    k.kubectl(
        "patch",
        "modelcache",
        name,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"replicas": 2}}),
    )
    wait_for(
        "the Deployment scaled to 2",
        lambda: (
            (k.get("deployment", name, "-n", namespace) or {}).get("spec", {}).get("replicas") == 2
        ),
        60,
        alive,
    )
    wait_for(
        "a status refresh by the timer",
        lambda: re.search(
            r'modelcache_operator_reconcile_total\{handler="timer",result="success"\} [1-9]',
            op.metrics(),
        ),
        60,
        alive,
    )
    # Delete: the operator's finalizer goes, the ModelCache goes.
    k.kubectl("delete", "modelcache", name, "-n", namespace, "--wait=false")
    wait_for(
        "the ModelCache to be deleted",
        lambda: k.get("modelcache", name, "-n", namespace) is None,
        60,
        alive,
    )
    op.check_alive()


def delete_cache(k: Kube, namespace: str, name: str) -> None:
    """Delete a ModelCache while an operator runs, so that its finalizer goes with it (a
    namespace holding a ModelCache with a finalizer and no operator never finishes deleting)."""
    k.kubectl(
        "delete",
        "modelcache",
        name,
        "-n",
        namespace,
        "--wait=false",
        "--ignore-not-found",
        check=False,
    )
    wait_for(
        f"ModelCache {name} to be deleted",
        lambda: k.get("modelcache", name, "-n", namespace) is None,
        60,
    )


def start_operator(k: Kube, tmp: Path, identity: str) -> ChartOperator:
    sa = k.deployment()["spec"]["template"]["spec"]["serviceAccountName"]
    kubeconfig = sa_kubeconfig(k, NAMESPACE, sa, tmp / f"{identity}.kubeconfig")
    return ChartOperator(k.deployment(), kubeconfig, tmp / f"{identity}.log", identity)


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def ports() -> tuple[int, int]:
    return free_port(), free_port()


def test_install(kube: Kube, ports: tuple[int, int], tmp_path: Path) -> None:
    out = kube.helm(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        NAMESPACE,
        "--create-namespace",
        values=base_values(*ports),
    )
    status = json.loads(kube.helm("status", RELEASE, "-n", NAMESPACE, "-o", "json"))
    assert status["info"]["status"] == "deployed"
    op = f"{RELEASE}-modelcache-operator"
    for kind, name in (("deployment", op), ("serviceaccount", op), ("service", f"{op}-metrics")):
        assert kube.get(kind, name, "-n", NAMESPACE), (kind, name)
    assert kube.get("clusterrole", op) and kube.get("clusterrolebinding", op)
    for crd in CRDS:
        kube.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        body = kube.get("crd", crd) or {}
        assert body["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # The controller-manager made a ReplicaSet and a Pod (which never runs: no kubelet).
    wait_for(
        "the operator's pod",
        lambda: (
            kube.get("pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=operator") or {}
        ).get("items"),
    )
    # NOTES: the first ModelCache they show is accepted by the API server's CRD schema.
    notes = out.split("NOTES:", 1)[1]
    assert "kubectl -n" in notes and "port-forward service/minilm 50051:50051" in notes
    example = re.search(r"cat <<'EOF' \| kubectl -n \S+ apply -f -\n(.*?)\n  EOF", notes, re.S)
    assert example, notes
    manifest = "\n".join(line[2:] for line in example.group(1).splitlines())
    body = yaml.safe_load(manifest)
    assert body["spec"]["image"] == "ghcr.io/modelcache/modelcache:0.1.0"
    kube.kubectl("apply", "--dry-run=server", "-n", NAMESPACE, "-f", "-", stdin=manifest)


def test_operator_full_reconcile_with_only_the_charts_rbac(kube: Kube, tmp_path: Path) -> None:
    ns = f"{NAMESPACE}-a"
    kube.kubectl("create", "namespace", ns)
    op = start_operator(kube, tmp_path, f"helm-op-{SUFFIX}")
    try:
        full_reconcile(kube, op, ns)
        text = op.metrics()
    finally:
        op.stop()
    assert not op.permission_errors()
    # The operator's own exposition: valid, and it has every operator metric the dashboard
    # and the alerts use.
    proc = subprocess.run(
        [tool("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    exported = exposition_names(text)
    used = {
        n
        for _, e in dashboard_targets(dashboard())
        for n in promql_metric_names(grafana_to_promql(e))
    }
    used |= {n for r in alert_rules(rendered_rules()) for n in promql_metric_names(r["expr"])}
    operator_metrics = {n for n in used if n.startswith("modelcache_operator_")}
    assert operator_metrics and operator_metrics <= exported, operator_metrics - exported
    # (Retries and rejected specs are not asserted away here: a cluster-wide operator on a
    # shared control plane also handles other tests' ModelCaches, some invalid on purpose.
    # RBAC denials are what the log check above catches.)


def test_daemon_pods_are_locked_down(kube: Kube, tmp_path: Path) -> None:
    """What the operator (with the chart's RBAC) creates for a ModelCache runs as non-root,
    read-only, without privilege escalation or capabilities."""
    ns = f"{NAMESPACE}-a"
    op = start_operator(kube, tmp_path, f"helm-op2-{SUFFIX}")
    try:
        kube.kubectl("apply", "-n", ns, "-f", "-", stdin=json.dumps(modelcache("locked")))
        dep = wait_for(
            "the daemon Deployment",
            lambda: kube.get("deployment", "locked", "-n", ns),
            60,
            op.check_alive,
        )
    finally:
        delete_cache(kube, ns, "locked")
        op.stop()
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]


def test_a_missing_permission_fails_the_reconcile(kube: Kube, tmp_path: Path) -> None:
    """Take one verb the operator needs (update Deployments) out of the chart's ClusterRole:
    the same reconcile now fails, so the test above would catch a rule missing from the
    chart. `helm upgrade` then puts the rule back."""
    op_name = f"{RELEASE}-modelcache-operator"
    role = kube.get("clusterrole", op_name) or {}
    for rule in role["rules"]:
        if "deployments" in rule["resources"]:
            rule["verbs"] = [v for v in rule["verbs"] if v != "update"]
    for key in ("resourceVersion", "uid", "creationTimestamp", "managedFields"):
        role["metadata"].pop(key, None)
    kube.kubectl("replace", "-f", "-", stdin=json.dumps(role))
    ns = f"{NAMESPACE}-a"
    op = start_operator(kube, tmp_path, f"helm-op3-{SUFFIX}")
    try:
        with pytest.raises(AssertionError, match="permission error"):
            full_reconcile(kube, op, ns, name="denied")
        assert op.permission_errors(), op.text()[-3000:]
    finally:
        delete_cache(kube, ns, "denied")  # removing the finalizer needs no update on Deployments
        op.stop()


def test_upgrade_turns_on_monitoring_and_network_policy(kube: Kube, ports: tuple[int, int]) -> None:
    values = {
        **base_values(*ports),
        "monitoring": {
            "serviceMonitor": {"enabled": True},
            "podMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
            "dashboard": {"enabled": True},
        },
        "networkPolicy": {"enabled": True},
    }
    kube.helm("upgrade", RELEASE, str(CHART), "-n", NAMESPACE, values=values)
    status = json.loads(kube.helm("status", RELEASE, "-n", NAMESPACE, "-o", "json"))
    assert status["version"] == 2 and status["info"]["status"] == "deployed"
    for kind in ("servicemonitors", "podmonitors"):
        items = (kube.get(f"{kind}.monitoring.coreos.com", "-n", NAMESPACE) or {})["items"]
        assert len(items) == 2, kind  # daemons and operator
    rules = (kube.get("prometheusrules.monitoring.coreos.com", "-n", NAMESPACE) or {})["items"]
    assert len(rules) == 1 and rules[0]["spec"]["groups"]
    cm = kube.get("configmap", f"{RELEASE}-modelcache-dashboard", "-n", NAMESPACE) or {}
    assert json.loads(cm["data"]["modelcache.json"])["uid"] == "modelcache"
    assert kube.get("networkpolicy", f"{RELEASE}-modelcache-daemons", "-n", NAMESPACE)
    # The upgrade also restored the ClusterRole the previous test trimmed.
    role = kube.get("clusterrole", f"{RELEASE}-modelcache-operator") or {}
    assert any("deployments" in r["resources"] and "update" in r["verbs"] for r in role["rules"])


def test_namespaced_operator_reconciles_with_roles_only(
    kube: Kube, ports: tuple[int, int], tmp_path: Path
) -> None:
    ns = f"{NAMESPACE}-b"
    kube.kubectl("create", "namespace", ns)
    kube.helm(
        "upgrade",
        RELEASE,
        str(CHART),
        "-n",
        NAMESPACE,
        values=base_values(*ports, watchNamespaces=[ns]),
    )
    op_name = f"{RELEASE}-modelcache-operator"
    assert kube.get("clusterrolebinding", op_name) is None
    assert kube.get("role", op_name, "-n", ns) and kube.get("rolebinding", op_name, "-n", ns)
    args = kube.deployment()["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == [f"--namespace={ns}"]
    op = start_operator(kube, tmp_path, f"helm-op4-{SUFFIX}")
    try:
        full_reconcile(kube, op, ns)
        # It has no rights elsewhere: another namespace's ModelCaches are not its business.
        proc = kube.kubectl(
            "auth",
            "can-i",
            "create",
            "deployments",
            "-n",
            f"{NAMESPACE}-a",
            f"--as=system:serviceaccount:{NAMESPACE}:{op_name}",
            check=False,
        )
        assert proc.stdout.strip() == "no"
    finally:
        op.stop()


def test_uninstall_keeps_the_crds(kube: Kube) -> None:
    kube.helm("uninstall", RELEASE, "-n", NAMESPACE)
    op_name = f"{RELEASE}-modelcache-operator"
    wait_for(
        "the operator's objects to go",
        lambda: (
            kube.get("deployment", op_name, "-n", NAMESPACE) is None
            and kube.get("clusterrole", f"{op_name}-cluster") is None
            and kube.get("serviceaccount", op_name, "-n", NAMESPACE) is None
        ),
    )
    for crd in CRDS:
        assert kube.get("crd", crd), f"{crd} was deleted despite crds.keep"
