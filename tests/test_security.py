"""Nobody let in (issue #6): TLS and mutual TLS on the gRPC port of a real
``modelcache serve`` process (settings from MODELCACHE_TLS_* in its environment, as the
operator sets them), with certificates made here by the openssl CLI; and a model source
outside the model volume failing through the real server.

Covered elsewhere: mTLS against an in-process server with a client that has no certificate
or speaks plaintext (test_serving.test_mutual_tls); remote code refused at load
(test_loader_files.test_remote_code_is_never_run_unless_trusted, and through the server in
test_faults); sources confined to model_root by ``..``, symlinks and absolute paths
(test_loader_files.test_sources_cannot_escape_the_model_volume).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import tiny_models
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelcache.client import ModelCacheClient, ModelCacheError
from modelcache.v1 import modelcache_pb2 as pb
from modelcache.v1 import modelcache_pb2_grpc as pb_grpc

pytest.register_assert_rewrite("daemon_process")
from daemon_process import ServeProcess  # noqa: E402

Code = grpc.StatusCode
EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")


def openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=60)


def make_pki(d: Path) -> None:
    """ca (trusted) and rogue (not) CAs; a server certificate for 127.0.0.1 from ca; client
    certificates from each CA."""
    for ca in ("ca", "rogue"):
        openssl(
            d,
            "req",
            "-x509",
            *EC,
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.pem",
            "-days",
            "2",
            "-subj",
            f"/CN={ca}",
        )
    for name, ca, ext in (
        (
            "server",
            "ca",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "ca", "extendedKeyUsage=clientAuth\n"),
        ("intruder", "rogue", "extendedKeyUsage=clientAuth\n"),
    ):
        openssl(
            d, "req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}"
        )
        (d / f"{name}.ext").write_text("basicConstraints=CA:FALSE\n" + ext)
        openssl(
            d,
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            f"{ca}.pem",
            "-CAkey",
            f"{ca}.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_pki(d)
    return d


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tls-models")
    tiny_models.bert(root / "volume" / "bert")
    tiny_models.bert(root / "outside")
    return root


def config(volume: Path) -> dict[str, Any]:
    return {
        "model_root": str(volume / "volume"),
        "models": [
            {"name": "bert", "source": "./bert", "task": "embedding"},
            {"name": "escape", "source": "../outside", "task": "embedding"},
        ],
    }


def daemon(volume: Path, pki: Path, workdir: Path, mutual: bool) -> ServeProcess:
    env = {
        "MODELCACHE_TLS_CERT": str(pki / "server.pem"),
        "MODELCACHE_TLS_KEY": str(pki / "server.key"),
    }
    if mutual:
        env["MODELCACHE_TLS_CLIENT_CA"] = str(pki / "ca.pem")
    return ServeProcess(config(volume), workdir, env=env, name="mtls" if mutual else "tls")


def client(
    proc: ServeProcess,
    pki: Path,
    ca: str | None = "ca",
    cert: str | None = None,
    timeout: float = 5,
) -> ModelCacheClient:
    kw: dict[str, Any] = {"timeout": timeout, "retry": None}
    if ca is not None:
        kw["root_certificates"] = (pki / f"{ca}.pem").read_bytes()
    if cert is not None:
        kw["private_key"] = (pki / f"{cert}.key").read_bytes()
        kw["certificate_chain"] = (pki / f"{cert}.pem").read_bytes()
    return ModelCacheClient(proc.address, **kw)


def refused(c: ModelCacheClient) -> ModelCacheError:
    with c, pytest.raises(ModelCacheError) as info:
        c.embed("bert", ["let me in"])
    assert info.value.code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED), info.value
    return info.value


@pytest.fixture(scope="module")
def tls(
    volume: Path, pki: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    with daemon(volume, pki, tmp_path_factory.mktemp("tls"), mutual=False) as proc:
        assert "(TLS)" in proc.log()
        with client(proc, pki, timeout=120) as c:
            c.wait_until_serving("bert", timeout=120)
        yield proc


@pytest.fixture(scope="module")
def mtls(
    volume: Path, pki: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    with daemon(volume, pki, tmp_path_factory.mktemp("mtls"), mutual=True) as proc:
        with client(proc, pki, cert="client", timeout=120) as c:
            c.wait_until_serving("bert", timeout=120)
        yield proc


@pytest.mark.slow
def test_tls_serves_a_client_that_trusts_the_ca(tls: ServeProcess, pki: Path) -> None:
    with client(tls, pki) as c:
        assert c.embed("bert", ["over TLS"]).shape == (1, 64)
        assert c.health("bert") == "SERVING"
        models = {m.name: m for m in c.list_models().models}
    # a source outside model_root fails through the real server, saying why
    assert models["escape"].state == "failed"
    assert "outside the model volume" in models["escape"].error
    # a client certificate is not required, and not refused, without a client CA
    with client(tls, pki, cert="client") as c:
        assert c.embed("bert", ["with a certificate anyway"]).shape == (1, 64)


@pytest.mark.slow
def test_tls_refuses_plaintext_and_untrusted_servers(tls: ServeProcess, pki: Path) -> None:
    refused(client(tls, pki, ca=None))  # plaintext to a TLS port: no handshake, no answer
    refused(client(tls, pki, ca="rogue"))  # the server's certificate is not from our CA
    # raw bytes do not get through either: plaintext HTTP/2 on the TLS port
    with grpc.insecure_channel(tls.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert info.value.code() in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)


@pytest.mark.slow
def test_mutual_tls_accepts_only_certificates_from_the_client_ca(
    mtls: ServeProcess, pki: Path
) -> None:
    with client(mtls, pki, cert="client") as c:
        assert c.embed("bert", ["a known client"]).shape == (1, 64)
    refused(client(mtls, pki, cert="intruder"))  # a certificate, but from another CA
    refused(client(mtls, pki))  # no certificate
    refused(client(mtls, pki, ca=None))  # plaintext
    # every RPC, not only the model service: health and reflection need the certificate
    creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    with grpc.secure_channel(mtls.address, creds) as channel:
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert info.value.code() in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)
        with pytest.raises(grpc.RpcError):
            pb_grpc.ModelCacheStub(channel).ListModels(  # type: ignore[no-untyped-call]
                pb.ListModelsRequest(), timeout=5
            )
    assert mtls.alive()
