"""Ask daemon pods what they hold: one ListModels call per pod, all in flight at once.

In a cluster the operator dials podIP:grpcPort directly (never the Service: it must know
which pod said what). ``daemon_address_override`` replaces every pod's address with one
host:port, so tests and local runs reach a daemon on loopback without any pod network.
Proxies are never used: the target is a pod, and an HTTP proxy could only get it wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from modelcache.operator.aggregate import ModelReport, PodAnswer
from modelcache.v1 import modelcache_pb2, modelcache_pb2_grpc

_CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", 8 << 20)]


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
    )


def _describe(exc: grpc.RpcError) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return f"{code.name if code else 'ERROR'}: {details}"


def list_models(pods: Sequence[Target], timeout: float) -> dict[str, PodAnswer]:
    """Every pod's answer (or the reason it gave none), within ``timeout`` seconds overall."""
    channels = [grpc.insecure_channel(t.address, options=_CHANNEL_OPTIONS) for t in pods]
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
                target.pod, models=tuple(to_report(m) for m in reply.models)
            )
        return answers
    finally:
        for ch in channels:
            ch.close()
