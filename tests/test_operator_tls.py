"""spec.tls: the daemon pod mounts the Secret and gets the TLS env; the operator's status
probe (ListModels) dials TLS / mutual TLS with the Secret's certificates. The probe is
checked against a real gRPC server with certificates made by the openssl CLI."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from modelcache.operator import builders, probe
from modelcache.operator.builders import Owner
from modelcache.operator.containers import TLS_DIR
from modelcache.operator.spec import DNS_SUBDOMAIN_PATTERN, SpecError, parse_spec
from modelcache.v1 import modelcache_pb2, modelcache_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
OWNER = Owner(name="cache", namespace="ml", uid="uid-1")
SERVER_NAME = "cache.ml.svc.cluster.local"


def _spec(**extra: Any) -> Any:
    return parse_spec(
        "cache",
        {
            "image": "registry.example/modelcache:0.1.0",
            "models": [{"name": "tiny", "source": "tiny", "task": "causal-lm"}],
            **extra,
        },
    )


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container["env"]}


def test_no_tls_by_default() -> None:
    pod = builders.build_pod_template(_spec(), OWNER)["spec"]
    assert not any(v["name"] == "tls" for v in pod["volumes"])
    assert not any(k.startswith("MODELCACHE_TLS") for k in _env(pod["containers"][0]))


@pytest.mark.parametrize("client_auth", [False, True])
def test_tls_secret_is_mounted_read_only_and_named_in_env(client_auth: bool) -> None:
    spec = _spec(tls={"secretName": "cache-tls", "clientAuth": client_auth})
    pod = builders.build_pod_template(spec, OWNER)["spec"]
    assert {"name": "tls", "secret": {"secretName": "cache-tls", "defaultMode": 0o440}} in pod[
        "volumes"
    ]
    daemon = pod["containers"][0]
    assert {"name": "tls", "mountPath": TLS_DIR, "readOnly": True} in daemon["volumeMounts"]
    env = _env(daemon)
    assert env["MODELCACHE_TLS_CERT"] == f"{TLS_DIR}/tls.crt"
    assert env["MODELCACHE_TLS_KEY"] == f"{TLS_DIR}/tls.key"
    assert ("MODELCACHE_TLS_CLIENT_CA" in env) == client_auth
    if client_auth:
        assert env["MODELCACHE_TLS_CLIENT_CA"] == f"{TLS_DIR}/ca.crt"
    # init containers (downloads) never see the Secret
    assert all(m["name"] != "tls" for c in pod["containers"][1:] for m in c["volumeMounts"])
    # turning TLS on or changing the Secret rolls the pods
    plain = builders.template_hash(_spec(), OWNER)
    other = builders.template_hash(_spec(tls={"secretName": "other"}), OWNER)
    assert len({plain, builders.template_hash(spec, OWNER), other}) == 3


def test_tls_spec_is_validated_and_mirrored_in_the_crd() -> None:
    with pytest.raises(SpecError, match=r"spec\.tls\.secretName"):
        _spec(tls={"secretName": "Bad_Name"})
    with pytest.raises(SpecError, match=r"spec\.tls"):
        _spec(tls={"clientAuth": True})
    crd = yaml.safe_load((ROOT / "deploy/helm/modelcache/files/crd-modelcaches.yaml").read_text())
    tls = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["tls"]
    assert tls["required"] == ["secretName"]
    assert tls["properties"]["secretName"]["pattern"] == DNS_SUBDOMAIN_PATTERN
    assert tls["properties"]["clientAuth"]["default"] is False


def test_probe_settings_from_the_secret() -> None:
    assert probe.tls_from_secret(None, "s", False, SERVER_NAME).error == "TLS Secret s not found"
    own = probe.tls_from_secret({"tls.crt": b"C", "tls.key": b"K"}, "s", False, SERVER_NAME)
    assert own.error is None and own.root_ca == b"C" and own.cert_chain is None
    ca = probe.tls_from_secret(
        {"tls.crt": b"C", "tls.key": b"K", "ca.crt": b"A"}, "s", True, SERVER_NAME
    )
    assert (ca.root_ca, ca.cert_chain, ca.private_key) == (b"A", b"C", b"K")
    bad = probe.tls_from_secret({"tls.crt": b"C", "tls.key": b"K"}, "s", True, SERVER_NAME)
    assert bad.error is not None and "ca.crt" in bad.error
    answers = probe.list_models([probe.Target("p", "127.0.0.1:1")], 1.0, bad)
    assert answers["p"].error == bad.error


# --- the probe against a real TLS server -------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A CA, and a leaf for SERVER_NAME usable as server and client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("certs")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=d,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={SERVER_NAME}",
        "-keyout",
        "tls.key",
        "-out",
        "tls.csr",
        cwd=d,
    )
    (d / "ext.cnf").write_text(
        f"subjectAltName=DNS:{SERVER_NAME}\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "tls.crt",
        cwd=d,
    )
    return {n: (d / n).read_bytes() for n in ("ca.crt", "tls.crt", "tls.key")}


class _Servicer(modelcache_pb2_grpc.ModelCacheServicer):
    def ListModels(self, request: Any, context: Any) -> Any:
        return modelcache_pb2.ListModelsResponse(
            models=[modelcache_pb2.ModelStatus(name="tiny", state=modelcache_pb2.ModelStatus.READY)]
        )


def _serve(certs: dict[str, bytes], client_auth: bool) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    modelcache_pb2_grpc.add_ModelCacheServicer_to_server(_Servicer(), server)  # type: ignore[no-untyped-call]
    creds = grpc.ssl_server_credentials(
        [(certs["tls.key"], certs["tls.crt"])],
        root_certificates=certs["ca.crt"] if client_auth else None,
        require_client_auth=client_auth,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(params=[False, True], ids=["tls", "mtls"])
def tls_server(
    request: pytest.FixtureRequest, certs: dict[str, bytes]
) -> Iterator[tuple[str, bool]]:
    server, address = _serve(certs, request.param)
    yield address, request.param
    server.stop(None)


def test_probe_dials_tls_and_mtls(tls_server: tuple[str, bool], certs: dict[str, bytes]) -> None:
    address, client_auth = tls_server
    target = [probe.Target("pod-0", address)]
    good = probe.tls_from_secret(certs, "cache-tls", client_auth, SERVER_NAME)
    answer = probe.list_models(target, 5.0, good)["pod-0"]
    assert answer.error is None and [m.state for m in answer.models] == ["READY"]
    # plaintext, or a certificate for another name, gets no answer
    assert probe.list_models(target, 2.0)["pod-0"].error is not None
    wrong = probe.tls_from_secret(certs, "cache-tls", client_auth, "other.ml.svc.cluster.local")
    assert probe.list_models(target, 2.0, wrong)["pod-0"].error is not None
    if client_auth:  # no client certificate: the server refuses
        server_only = probe.tls_from_secret(certs, "cache-tls", False, SERVER_NAME)
        assert probe.list_models(target, 2.0, server_only)["pod-0"].error is not None
