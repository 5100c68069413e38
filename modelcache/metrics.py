"""Every Prometheus metric modelcache exports, and every bucket set, in one place.

The daemon and the operator run in different processes, so each has its own registry:
dashboards and alert rules (deploy/helm) refer to these names, and a test parses a live
exposition to check that every name they use exists here.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

DAEMON_REGISTRY = CollectorRegistry(auto_describe=True)
OPERATOR_REGISTRY = CollectorRegistry(auto_describe=True)

# Loads take from milliseconds (tiny test models) to many minutes (70B from a slow volume).
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)
# Requests: sub-millisecond queueing up to multi-second long-context forwards.
REQUEST_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
RECONCILE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# --- daemon: loading ---------------------------------------------------------------
MODEL_LOAD_SECONDS = Histogram(
    "modelcache_model_load_seconds",
    "Seconds spent loading a model, by stage (resolve, read, materialize, verify, warmup) "
    "and stage=total for the whole load.",
    ["model", "stage"],
    buckets=LOAD_BUCKETS,
    registry=DAEMON_REGISTRY,
)
MODEL_LOADS = Counter(
    "modelcache_model_loads",
    "Model load attempts by outcome (success, or the failure class).",
    ["model", "outcome"],
    registry=DAEMON_REGISTRY,
)
META_TENSOR_ERRORS = Counter(
    "modelcache_meta_tensor_errors",
    "Meta tensors or corrupted global loader state found (kind: parameter, buffer, "
    "global_state). Any increase means a load would have been silently wrong.",
    ["model", "kind"],
    registry=DAEMON_REGISTRY,
)
MODEL_LOADED = Gauge(
    "modelcache_model_loaded",
    "1 when the model is loaded, verified and serving, else 0.",
    ["model"],
    registry=DAEMON_REGISTRY,
)
MODEL_WEIGHT_BYTES = Gauge(
    "modelcache_model_weight_bytes",
    "Bytes of parameters and buffers of a loaded model, by device.",
    ["model", "device"],
    registry=DAEMON_REGISTRY,
)
BUILD_INFO = Gauge(
    "modelcache_build_info",
    "Always 1; labels carry the versions this process runs, so version skew across pods "
    "is one `count by (...)` away.",
    ["version", "torch", "transformers", "python", "cuda"],
    registry=DAEMON_REGISTRY,
)

# --- daemon: serving ---------------------------------------------------------------
REQUESTS = Counter(
    "modelcache_requests",
    "RPCs answered, by model, method and gRPC status code.",
    ["model", "method", "code"],
    registry=DAEMON_REGISTRY,
)
REQUEST_DURATION = Histogram(
    "modelcache_request_duration_seconds",
    "Request time by phase: queue (admission to batch start), compute (batch forward), "
    "total (as seen by the servicer).",
    ["model", "method", "phase"],
    buckets=REQUEST_BUCKETS,
    registry=DAEMON_REGISTRY,
)
BATCH_SIZE = Histogram(
    "modelcache_batch_size",
    "Sequences per forward pass.",
    ["model"],
    buckets=BATCH_SIZE_BUCKETS,
    registry=DAEMON_REGISTRY,
)
BATCH_TOKENS = Histogram(
    "modelcache_batch_tokens",
    "Padded tokens per forward pass (rows x longest sequence).",
    ["model"],
    buckets=BATCH_TOKEN_BUCKETS,
    registry=DAEMON_REGISTRY,
)
BATCH_OOM = Counter(
    "modelcache_batch_oom",
    "Batches that ran out of device memory: outcome=split (computed again in two halves) "
    "or too_large (one sequence that does not fit alone: RESOURCE_EXHAUSTED).",
    ["model", "outcome"],
    registry=DAEMON_REGISTRY,
)
DEVICE_FAILURES = Counter(
    "modelcache_device_failures",
    "Device errors that poison the CUDA context (device-side assert, illegal memory "
    "access): the model turns NOT_SERVING and the daemon exits to be restarted.",
    ["model"],
    registry=DAEMON_REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "modelcache_queue_depth",
    "Sequences admitted and waiting for a forward pass.",
    ["model"],
    registry=DAEMON_REGISTRY,
)
TOKENS = Counter(
    "modelcache_tokens",
    "Input tokens processed (unpadded).",
    ["model", "method"],
    registry=DAEMON_REGISTRY,
)
WORKER_RESTARTS = Counter(
    "modelcache_worker_restarts",
    "Batch worker threads that died and were restarted.",
    ["model"],
    registry=DAEMON_REGISTRY,
)
CONFIG_RELOADS = Counter(
    "modelcache_config_reloads",
    "Changed configuration files the daemon read: applied, invalid (kept the running one), "
    "unreadable, or error (applying raised).",
    ["result"],
    registry=DAEMON_REGISTRY,
)
DEVICE_MEMORY_BYTES = Gauge(
    "modelcache_device_memory_bytes",
    "Memory on a device: kind=allocated|reserved|total (CUDA) or rss (process, cpu).",
    ["device", "kind"],
    registry=DAEMON_REGISTRY,
)

# --- operator ----------------------------------------------------------------------
RECONCILE = Counter(
    "modelcache_operator_reconcile",
    "Operator reconciliations by handler and result (success, retry, permanent_error; busy: a "
    "status tick skipped because a handler was converging the same ModelCache).",
    ["handler", "result"],
    registry=OPERATOR_REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "modelcache_operator_reconcile_duration_seconds",
    "Seconds per reconciliation, by handler.",
    ["handler"],
    buckets=RECONCILE_BUCKETS,
    registry=OPERATOR_REGISTRY,
)
OPERATOR_MANAGED = Gauge(
    "modelcache_operator_modelcaches",
    "ModelCache resources seen by this operator, by phase.",
    ["namespace", "phase"],
    registry=OPERATOR_REGISTRY,
)
MODELCACHE_READY = Gauge(
    "modelcache_operator_modelcache_ready",
    "1 when the ModelCache is in phase Ready, else 0; one series per ModelCache (the "
    "namespace label is the ModelCache's), removed when the resource is deleted.",
    ["namespace", "name"],
    registry=OPERATOR_REGISTRY,
)
OPERATOR_KOPF_RESTARTS = Counter(
    "modelcache_operator_kopf_restarts",
    "kopf runs that ended on an error and were restarted in-process, by exception type "
    "(e.g. a watch answered 404 while a restarted API server was still registering CRDs).",
    ["reason"],
    registry=OPERATOR_REGISTRY,
)
OPERATOR_BUILD_INFO = Gauge(
    "modelcache_operator_build_info",
    "Always 1; the operator's versions.",
    ["version", "kopf", "python"],
    registry=OPERATOR_REGISTRY,
)


def python_version() -> str:
    return platform.python_version()


def forget_model(name: str) -> None:
    """Remove a model's gauge series (loaded, weight bytes, queue depth): for a model that is
    no longer configured they would report a state that no longer exists. Counters and
    histograms stay; they only ever describe the past."""
    for gauge in (MODEL_LOADED, MODEL_WEIGHT_BYTES, QUEUE_DEPTH):
        for family in gauge.collect():
            for sample in family.samples:
                if sample.labels.get("model") == name:
                    gauge.remove(*sample.labels.values())


def record_served(name: str, device: str, weight_bytes: int) -> None:
    """A model serves (new) weights: loaded 1 and its bytes on its device only."""
    for family in MODEL_WEIGHT_BYTES.collect():
        for sample in family.samples:
            if sample.labels.get("model") == name and sample.labels.get("device") != device:
                MODEL_WEIGHT_BYTES.remove(*sample.labels.values())
    MODEL_WEIGHT_BYTES.labels(model=name, device=device).set(weight_bytes)
    MODEL_LOADED.labels(model=name).set(1)
