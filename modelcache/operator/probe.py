"""Ask daemon pods what they hold: one ListModels call per pod, all in flight at once.

In a cluster the operator dials podIP:grpcPort directly (never the Service: it must know
which pod said what). ``daemon_address_override`` replaces every pod's address with one
host:port, so tests and local runs reach a daemon on loopback without any pod network.
Proxies are never used: the target is a pod, and an HTTP proxy could only get it wrong.

With ``spec.tls`` the call is made over TLS (``ProbeTls``, built from the ModelCache's Secret
by the reconciler): the daemon's certificate is verified against the Secret's ca.crt (or,
without one, tls.crt itself: a self-signed certificate) and checked for the host name clients
use, NAME.NAMESPACE.svc.CLUSTER_DOMAIN (the status endpoint), since a pod IP is in no
certificate. With ``clientAuth`` the operator presents the same Secret's tls.crt / tls.key as
its client certificate, so that certificate must allow client use (extendedKeyUsage
clientAuth, or no extendedKeyUsage) and be signed by ca.crt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from modelcache.operator.aggregate import ModelReport, PodAnswer
from modelcache.v1 import modelcache_pb2, modelcache_pb2_grpc

_CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", 8 << 20)]


@dataclass(frozen=True)
class ProbeTls:
    """How to dial daemons that serve TLS; ``error`` set: the probe cannot be made."""

    server_name: str
    root_ca: bytes = b""
    cert_chain: bytes | None = None
    private_key: bytes | None = None
    error: str | None = None


def tls_from_secret(
    data: dict[str, bytes] | None, secret: str, client_auth: bool, server_name: str
) -> ProbeTls:
    """The probe's TLS settings from a kubernetes.io/tls Secret's decoded data (None: the
    Secret does not exist)."""
    if data is None:
        return ProbeTls(server_name, error=f"TLS Secret {secret} not found")
    root = data.get("ca.crt") or data.get("tls.crt")
    if not root:
        return ProbeTls(server_name, error=f"TLS Secret {secret} has neither ca.crt nor tls.crt")
    if not client_auth:
        return ProbeTls(server_name, root_ca=root)
    missing = [k for k in ("ca.crt", "tls.crt", "tls.key") if not data.get(k)]
    if missing:
        return ProbeTls(
            server_name,
            error=f"TLS Secret {secret} lacks {', '.join(missing)}, needed for clientAuth",
        )
    return ProbeTls(
        server_name, root_ca=root, cert_chain=data["tls.crt"], private_key=data["tls.key"]
    )


def _channel(address: str, tls: ProbeTls | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
    creds = grpc.ssl_channel_credentials(tls.root_ca, tls.private_key, tls.cert_chain)
    options = [*_CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", tls.server_name)]
    return grpc.secure_channel(address, creds, options=options)


@dataclass(frozen=True)
class Target:
    pod: str
    address: str  # host:port


def targets(
    pods: Sequence[tuple[str, str | None]], port: int, override: str | None
) -> list[Target]:
    """Where to reach each (pod name, pod IP); pods without an IP yet are skipped."""
    out = []
    for name, ip in pods:
        if override:
            out.append(Target(name, override))
        elif ip:
            host = f"[{ip}]" if ":" in ip else ip
            out.append(Target(name, f"{host}:{port}"))
    return out


def to_report(m: modelcache_pb2.ModelStatus) -> ModelReport:
    total = m.load_seconds.get("total")
    return ModelReport(
        name=m.name,
        state=modelcache_pb2.ModelStatus.State.Name(m.state),
        error=m.error,
        error_class=m.error_class,
        device=m.device,
        dtype=m.dtype,
        revision=m.revision,
        fingerprint=m.fingerprint,
        weight_bytes=int(m.weight_bytes),
        load_seconds=float(total) if total is not None else None,
        load_failures=int(m.load_failures),
        next_retry_unix=float(m.next_retry_unix),
        pending_update=m.pending_update,
    )


def _describe(exc: grpc.RpcError) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return f"{code.name if code else 'ERROR'}: {details}"


def list_models(
    pods: Sequence[Target], timeout: float, tls: ProbeTls | None = None
) -> dict[str, PodAnswer]:
    """Every pod's answer (or the reason it gave none), within ``timeout`` seconds overall."""
    if tls is not None and tls.error is not None:
        return {t.pod: PodAnswer(t.pod, error=tls.error) for t in pods}
    channels = [_channel(t.address, tls) for t in pods]
    try:
        stubs = [
            modelcache_pb2_grpc.ModelCacheStub(ch)  # type: ignore[no-untyped-call]
            for ch in channels
        ]
        futures = [
            stub.ListModels.future(modelcache_pb2.ListModelsRequest(), timeout=timeout)
            for stub in stubs
        ]
        answers = {}
        for target, future in zip(pods, futures, strict=True):
            try:
                reply = future.result()
            except grpc.RpcError as exc:
                answers[target.pod] = PodAnswer(target.pod, error=_describe(exc))
                continue
            answers[target.pod] = PodAnswer(
                target.pod,
                models=tuple(to_report(m) for m in reply.models),
                config_hash=reply.config_hash,
            )
        return answers
    finally:
        for ch in channels:
            ch.close()
