"""The daemon's configuration file: one YAML document, validated by pydantic.

The same models are described by the operator's CRD (``spec.models[]``); the operator
renders this file into a ConfigMap, so field names and constraints here are the contract
between the two. Validation errors name the offending field (``models.1.dtype``) because
a user reading a CrashLoopBackOff log has nothing else to go on.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Task = Literal["embedding", "causal-lm"]
#: ``auto``: the checkpoint's own dtype (config.json ``dtype`` / ``torch_dtype``) on a CUDA
#: device — an 8B bf16 checkpoint served in float32 needs twice the memory and runs at a
#: fraction of the speed — and float32 on a CPU, where half-precision matmuls are slow.
DType = Literal["auto", "float32", "float16", "bfloat16"]
_CONCRETE = ("float32", "float16", "bfloat16")
Pooling = Literal["mean", "cls", "last", "max", "weightedmean"]

MODEL_NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
REVISION_PATTERN = r"^[0-9a-f]{40}$"
DEVICE_PATTERN = r"^(cpu|cuda|cuda:[0-9]+)$"
HUB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$"


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchingConfig(_Strict):
    """Knobs of the per-model dynamic batcher (TEI-style)."""

    max_batch_tokens: Annotated[int, Field(ge=1, le=1_048_576)] = 16384
    max_batch_size: Annotated[int, Field(ge=1, le=4096)] = 64
    max_wait_ms: Annotated[float, Field(ge=0, le=10_000)] = 2.0
    max_queue: Annotated[int, Field(ge=1, le=1_000_000)] = 1024
    max_inputs_per_request: Annotated[int, Field(ge=1, le=65536)] = 256
    max_input_chars: Annotated[int, Field(ge=1)] = 200_000


class ModelSpec(_Strict):
    """One model the daemon holds. ``name`` is what clients ask for.

    Embeddings are served as the checkpoint was trained: when its directory has
    sentence-transformers modules (modules.json with Pooling, Dense, Normalize;
    config_sentence_transformers.json with named prompts), they decide the pooling, the
    Dense projections, the normalization and the prompts (see daemon.stmodules), because a
    CLS-trained model pooled by mean serves plausible, wrong vectors.

    - ``pooling`` (mean, cls, last, max, weightedmean) and ``normalize``: unset (null) means
      the checkpoint's modules, or mean and true for a checkpoint without them. A value that
      contradicts the modules fails the model's load naming both, unless
      ``override_sentence_transformers`` is true: then the YAML's value is served, on purpose
      (the Dense projections and prompts still come from the checkpoint).
    - ``max_length`` is capped by the modules' max_seq_length, as the tokenizer's is.
    """

    name: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
    source: Annotated[str, Field(min_length=1)]
    revision: Annotated[str | None, Field(pattern=REVISION_PATTERN)] = None
    task: Task
    dtype: DType = "auto"
    device: Annotated[str, Field(pattern=DEVICE_PATTERN)] = "cpu"
    pooling: Pooling | None = None
    normalize: bool | None = None
    override_sentence_transformers: bool = False
    max_length: Annotated[int, Field(ge=1, le=1_048_576)] = 512
    allow_missing: tuple[str, ...] = ()
    allow_unexpected: tuple[str, ...] = ()
    trust_remote_code: bool = False

    @field_validator("allow_missing", "allow_unexpected")
    @classmethod
    def _regexes_compile(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {p!r}: {exc}") from exc
        return patterns

    @model_validator(mode="after")
    def _hub_ids_need_a_revision(self) -> ModelSpec:
        if self.is_hub_id and self.revision is None:
            raise ValueError(
                f"source {self.source!r} is a hub id, so 'revision' must pin it to a commit "
                "sha (40 hex characters); branch names and tags can move"
            )
        return self

    @property
    def is_hub_id(self) -> bool:
        """A source is a local path if it is absolute or starts with ./ or ../."""
        s = self.source
        if s.startswith(("/", "./", "../")) or s in (".", ".."):
            return False
        return re.match(HUB_ID_PATTERN, s) is not None and "/" in s


def resolve_dtype(spec: ModelSpec, checkpoint_dtype: object) -> ModelSpec:
    """``spec`` with a concrete dtype: ``auto`` becomes the checkpoint's dtype on CUDA
    (float32 when the checkpoint names none, or one the daemon does not serve, e.g.
    float64), float32 on a CPU. ``checkpoint_dtype`` is the transformers config's
    ``dtype`` (a torch.dtype or a string); an explicit dtype is kept as configured."""
    if spec.dtype != "auto":
        return spec
    name = str(checkpoint_dtype or "").removeprefix("torch.")
    on_cuda = spec.device.startswith("cuda")
    dtype = name if on_cuda and name in _CONCRETE else "float32"
    return spec.model_copy(update={"dtype": dtype})


LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class DaemonConfig(_Strict):
    """The whole file. ``model_root`` confines relative sources and hub caches.

    A running ``modelcache serve`` re-reads it when it changes (or on SIGHUP) and applies the
    difference live: see modelcache.daemon.changes. ``log_level`` (unset: the process's
    ``--log-level`` / MODELCACHE_LOG_LEVEL) is here so that it, too, changes without a
    restart."""

    models: Annotated[tuple[ModelSpec, ...], Field(min_length=1)]
    model_root: Path | None = None
    batching: BatchingConfig = BatchingConfig()
    log_level: LogLevel | None = None
    #: TF32 for float32 matmuls and convolutions on CUDA (process-wide: every model):
    #: ~8x the float32 matmul throughput of an A100/H100 for a 10-bit mantissa in the
    #: products (log-prob deltas ~1e-3). Off by default: float32 means float32.
    tf32: bool = False

    @field_validator("models")
    @classmethod
    def _names_unique(cls, models: tuple[ModelSpec, ...]) -> tuple[ModelSpec, ...]:
        seen: set[str] = set()
        for m in models:
            if m.name in seen:
                raise ValueError(f"duplicate model name {m.name!r}: names must be unique")
            seen.add(m.name)
        return models

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


def parse_config(data: object, *, origin: str = "<config>") -> DaemonConfig:
    try:
        return DaemonConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration in {origin}:\n{_format_errors(exc)}") from None


def load_config(path: str | Path) -> DaemonConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {p}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"configuration {p} must be a mapping with a 'models' list")
    return parse_config(data, origin=str(p))
