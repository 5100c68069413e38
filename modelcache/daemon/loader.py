"""Loading one model: resolve → read → materialize → verify → warmup, with metrics.

``prepare_model`` (resolve) runs on the main thread; ``load_model`` runs the rest, under
the process-wide ``LOAD_LOCK`` except for a streamed read (see below and globalstate). The
result holds no reference to the checkpoint files: weights live in memory the process
owns (see weights), so the files can be rewritten or deleted while the model serves.

Two ways to read: whole shards into owned memory, then assign (the CPU default: tensors
stay zero-copy views of the read buffer), or streaming through a small ring of buffers
into parameters allocated on the device (the CUDA default; see streaming). Either way the
memory it will take is checked first (hostmem) and a model that does not fit fails as
``out_of_memory`` before anything is allocated.

Loads onto different devices overlap where that is safe. Building a model (transformers'
patches of torch.nn.init and friends, our ``register_parameter`` hook), placing the rest,
tying weights, verifying and warming up run under ``LOAD_LOCK``, each stretch bracketed by
the global-state checks, because a concurrent build would see (or undo) another's patches.
A streamed load's reads and copies touch no process-global state and run without the lock
(``streaming.Stream``): with the registry's loader per device (registry.py), a load onto
``cuda:1`` streams while another onto ``cuda:0`` builds. The whole-shard path (CPU) holds
the lock throughout; loads onto one device stay one at a time.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import transformers

from modelcache.config import ModelSpec
from modelcache.daemon import globalstate, hostmem, keys, stmodules, streaming, verify, wire
from modelcache.daemon.conversion import plan_conversion
from modelcache.daemon.errors import ModelLoadError
from modelcache.daemon.materialize import (
    assign_weights,
    construct,
    construct_on,
    destinations,
    finish,
    param_dtypes,
)
from modelcache.daemon.resolve import PreparedModel, prepare_model
from modelcache.daemon.reverse import live_views
from modelcache.daemon.weights import read_shard
from modelcache.metrics import (
    BUILD_INFO,
    META_TENSOR_ERRORS,
    MODEL_LOAD_SECONDS,
    MODEL_LOADS,
)
from modelcache.settings import DaemonSettings

__all__ = [
    "LoadedModel",
    "PreparedModel",
    "count_failure",
    "load_model",
    "prepare_model",
    "versions",
]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any  # transformers.PreTrainedModel, eval mode, grads off
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    revision: str
    weight_bytes: int
    output_dims: int
    path: Path
    canary: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    #: How hidden states become served vectors (embedding models), Dense weights on device.
    recipe: stmodules.Recipe | None = None


def versions() -> dict[str, str]:
    try:
        own = metadata.version("modelcache")
    except metadata.PackageNotFoundError:
        own = "unknown"
    return {
        "modelcache": own,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "none",
    }


def record_build_info() -> None:
    v = versions()
    BUILD_INFO.labels(
        version=v["modelcache"],
        torch=v["torch"],
        transformers=v["transformers"],
        python=v["python"],
        cuda=v["cuda"],
    ).set(1)


def _device(spec: ModelSpec) -> torch.device:
    device = torch.device(spec.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                "device", f"device {spec.device} requested but CUDA is not available on this node"
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(
                "device",
                f"device {spec.device} requested but this node has "
                f"{torch.cuda.device_count()} GPU(s)",
            )
        device = torch.device("cuda", index)
    return device


def _weight_bytes(model: Any) -> int:
    """Bytes of the storages the model holds (a view keeps its whole storage alive)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _check_globals(name: str) -> None:
    changed = globalstate.check_and_restore()
    if changed:
        META_TENSOR_ERRORS.labels(model=name, kind="global_state").inc()
        log.warning(
            "model %s: process-global loader state was modified by someone else and has been "
            "restored: %s",
            name,
            ", ".join(changed),
        )


@contextlib.contextmanager
def _global_phase(name: str) -> Iterator[None]:
    """A stretch of a load that builds or changes modules: under LOAD_LOCK, bracketed by
    the global-state checks (whatever changed them meanwhile is restored and counted)."""
    with globalstate.LOAD_LOCK:
        _check_globals(name)
        try:
            yield
        finally:
            _check_globals(name)


def streams(device: torch.device) -> bool:
    """Whether this load goes through the streaming ring (MODELCACHE_STREAMING_LOAD; by
    default on CUDA only: on the CPU whole-shard reads with zero-copy views are faster)."""
    forced = DaemonSettings.model_validate({}).streaming_load
    return device.type == "cuda" if forced is None else forced


def _read_whole(
    prepared: PreparedModel, model: Any, plan: Any, device: torch.device, dtype: torch.dtype
) -> float:
    """Every shard into owned memory, then tensors assigned (views where they can be)."""
    clock = time.perf_counter()
    ckpt: dict[str, torch.Tensor] = {}
    for shard in prepared.shards:
        ckpt.update(read_shard(shard))
    read = time.perf_counter() - clock
    assign_weights(model, prepared, plan, ckpt, device, dtype)
    return read


def _check_whole_read(prepared: PreparedModel, device: torch.device, dtype: torch.dtype) -> None:
    """The whole checkpoint is held in host memory at once; on the CPU, tensors cast to
    another dtype are copies on top of it."""
    needed = sum(s.size for s in prepared.shards)
    casts = any(
        t.dtype.is_floating_point and t.dtype != dtype for s in prepared.shards for t in s.tensors
    )
    if device.type == "cpu" and casts:
        needed += streaming.model_bytes(prepared.shards, dtype)
    hostmem.require_host(needed, "reading the checkpoint")


def _load(prepared: PreparedModel, stages: dict[str, float]) -> LoadedModel:
    spec = prepared.spec
    device, dtype = _device(spec), DTYPES[spec.dtype]
    clock = time.perf_counter()

    # Plan from the headers before reading a byte: a checkpoint that cannot be loaded
    # faithfully (quantized, keys with no place) fails before its weights are read, and one
    # that does not fit fails before anything is allocated.
    infos = {t.name: t for shard in prepared.shards for t in shard.tensors}
    files = {t.name: (t, shard.path) for shard in prepared.shards for t in shard.tensors}
    shapes = {k: t.shape for k, t in infos.items()}
    streamed = streams(device)
    with _global_phase(spec.name):
        if streamed:
            streaming.check_memory(prepared.shards, device, dtype)
            model = construct_on(prepared, device, dtype)
        else:
            _check_whole_read(prepared, device, dtype)
            model = construct(prepared)
        plan = plan_conversion(model, shapes)
        keys.check_plan(model, prepared, plan, infos)
        # Building and planning is materialize time (the stage names are a metric's labels).
        planned, clock = time.perf_counter() - clock, time.perf_counter()
        if streamed:
            stream = streaming.Stream(
                prepared.shards, plan, destinations(model, plan, dtype, device), device
            )
        else:
            stages["read"] = _read_whole(prepared, model, plan, device, dtype)
    if streamed:
        stream.run()  # reads and copies overlap; unlocked: see the module docstring
        stages["read"], clock = time.perf_counter() - clock, time.perf_counter()
    with _global_phase(spec.name):
        if streamed:
            finish(model, prepared, plan, dict(shapes), device, dtype)
        model.eval()
        model.requires_grad_(False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stages["materialize"], clock = planned + time.perf_counter() - clock, time.perf_counter()

        verify.check_placement(model, spec.name, device, param_dtypes(model, dtype))
        verify.check_finite(model)
        live = model.state_dict()
        views = live_views(plan, live, {k: t.shape for k, t in infos.items()})
        digest = verify.fingerprint(views, {c: files[c] for c in views})
        recipe = prepared.recipe
        if recipe is not None and recipe.dense:
            # The projection is part of the served model: its weights enter the fingerprint.
            digest = stmodules.fingerprint(digest, recipe)
            recipe = stmodules.on_device(recipe, device, dtype)
        stages["verify"], clock = time.perf_counter() - clock, time.perf_counter()

        canary = verify.canary(model, prepared.tokenizer, spec.task, device)
        stages["warmup"] = time.perf_counter() - clock

    text_cfg = prepared.config.get_text_config()
    if spec.task == "causal-lm":
        dims = int(model.get_output_embeddings().weight.shape[0])
    else:
        hidden = int(getattr(text_cfg, "hidden_size", 0) or 0)
        dims = recipe.dims(hidden) if recipe is not None else hidden
    loaded = LoadedModel(
        spec=spec,
        model=model,
        tokenizer=prepared.tokenizer,
        device=device,
        dtype=dtype,
        fingerprint=digest,
        revision=prepared.revision,
        weight_bytes=_weight_bytes(model),
        output_dims=dims,
        path=prepared.path,
        canary=canary,
        stage_seconds=stages,
        recipe=recipe,
    )
    wire.check(loaded)  # an impossible max_length fails this model, not ListModels
    return loaded


def count_failure(name: str, error_class: str) -> None:
    """One failed attempt (modelcache_model_loads_total{outcome=<class>}). Whether the model
    serves (modelcache_model_loaded) is the registry's to say: an update that fails leaves
    the old weights serving."""
    MODEL_LOADS.labels(model=name, outcome=error_class).inc()


def load_model(prepared: PreparedModel) -> LoadedModel:
    """Load, verify and warm up one prepared model. Raises ModelLoadError, counted."""
    name = prepared.spec.name
    stages = {"resolve": prepared.resolve_seconds}
    started = time.perf_counter()
    try:
        loaded = _load(prepared, stages)
    except ModelLoadError as exc:
        count_failure(name, exc.error_class)
        raise
    except (torch.OutOfMemoryError, MemoryError) as exc:
        count_failure(name, "out_of_memory")
        raise ModelLoadError("out_of_memory", f"out of memory while loading: {exc}") from None
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0]
        # torch's CPU allocator reports exhaustion as a plain RuntimeError.
        if isinstance(exc, RuntimeError) and (
            "can't allocate memory" in str(exc) or "out of memory" in str(exc)
        ):
            count_failure(name, "out_of_memory")
            raise ModelLoadError("out_of_memory", f"out of memory while loading: {first}") from None
        count_failure(name, "internal")
        raise ModelLoadError("internal", f"{type(exc).__name__}: {first}") from None
    stages["total"] = prepared.resolve_seconds + time.perf_counter() - started
    for stage, seconds in stages.items():
        MODEL_LOAD_SECONDS.labels(model=name, stage=stage).observe(seconds)
    MODEL_LOADS.labels(model=name, outcome="success").inc()
    return loaded
