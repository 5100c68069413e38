"""Process settings from the environment (prefix ``MODELCACHE_``) or CLI flags.

What a model is lives in the config file (modelcache.config); how the process runs
(ports, TLS, log level) lives here, so the operator can set it per pod through env.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class DaemonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELCACHE_", extra="ignore")

    config: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9400, ge=0, le=65535)
    log_level: str = "INFO"
    # Optional TLS on the gRPC port; client_ca turns on mutual TLS.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Seconds between worker liveness checks.
    watchdog_interval: float = Field(1.0, gt=0)
    grpc_max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    grpc_threads: int = Field(16, ge=1)
    # Niceness of the threads that tokenize requests (see server.lower_thread_priority).
    # Off by default: a niced thread preempted while it holds the GIL stalls the event loop
    # (measured: refusals answered within 1 ms fell from 97 % to 70 % under overload).
    admit_nice: int = Field(0, ge=0, le=19)
    # Threads reading a checkpoint shard in parallel spans; 0 = one per usable CPU, at most 8.
    read_threads: int = Field(0, ge=0, le=64)
    # Streaming loads (daemon/streaming.py): shards pass through a ring of load_buffers host
    # buffers of load_buffer_mib each (pinned on CUDA; unset: 256 MiB on CUDA, 32 on CPU).
    # streaming_load unset: stream on CUDA, read whole shards on CPU (faster there, see
    # README); true/false forces one way on every device.
    streaming_load: bool | None = None
    load_buffers: int = Field(3, ge=2, le=8)
    load_buffer_mib: int | None = Field(None, ge=1, le=4096)
    # Seconds between looks at the config file (a ConfigMap volume changes by a symlink
    # swap); 0: never re-read it (SIGHUP still does).
    config_poll_s: float = Field(2.0, ge=0)
    # A failed load is retried after retry_initial_s, doubling up to retry_max_s.
    retry_initial_s: float = Field(5.0, gt=0)
    retry_max_s: float = Field(300.0, gt=0)
    # On SIGTERM, keep serving this long while health and /readyz say NOT_SERVING, so that
    # load balancers (Endpoints, kube-proxy) stop sending before the port closes.
    shutdown_delay_s: float = Field(0.0, ge=0, le=300)
    # Seconds in-flight requests get to finish when the daemon stops (and when a removed or
    # replaced model's worker drains).
    drain_s: float = Field(10.0, ge=0, le=3000)
    # A client connection is closed (GOAWAY) after this many seconds, plus a grace for the
    # calls on it, so round-robin clients re-resolve and reach replicas added since; 0: never.
    max_connection_age_s: float = Field(300.0, ge=0)
    max_connection_age_grace_s: float = Field(30.0, ge=0)
    # /livez fails when the event loop has not run for this many seconds.
    liveness_loop_stall_s: float = Field(30.0, gt=0)
