"""What a failed forward pass means for the batch, the model and the process.

Three kinds, because each needs a different answer:

- ``oom``: the batch did not fit (``torch.OutOfMemoryError``, or the RuntimeError torch's
  allocators raise: "out of memory", "can't allocate memory"). Nothing is broken: the batch
  is split and retried, and a sequence that does not fit alone is RESOURCE_EXHAUSTED.
- ``fatal``: the CUDA context is poisoned (a device-side assert, an illegal memory access,
  any "CUDA error" torch reports as ``AcceleratorError``). Every later kernel in the process
  fails or, worse, computes on corrupt state; the only cure is a new process. The model is
  reported NOT_SERVING and the daemon exits non-zero so the kubelet restarts it.
- ``error``: anything else (a bad input, a bug): the request fails, the worker serves on.
"""

from __future__ import annotations

from typing import Literal

import torch

Kind = Literal["oom", "fatal", "error"]

_OOM_MARKERS = ("out of memory", "can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED")
_FATAL_MARKERS = (
    "CUDA error",
    "device-side assert",
    "illegal memory access",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "cudaErrorLaunchFailure",
)
_ACCELERATOR_ERROR: type[BaseException] | None = getattr(torch, "AcceleratorError", None)


def classify(exc: BaseException) -> Kind:
    """The kind of a forward pass's failure (OOM is checked first: "CUDA error: out of
    memory" from a raw cudaMalloc is an OOM, not a poisoned context)."""
    message = str(exc)
    if isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(m in message for m in _OOM_MARKERS)
    ):
        return "oom"
    if _ACCELERATOR_ERROR is not None and isinstance(exc, _ACCELERATOR_ERROR):
        return "fatal"
    if isinstance(exc, RuntimeError) and any(m in message for m in _FATAL_MARKERS):
        return "fatal"
    return "error"


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, short enough for a status message."""
    line = (str(exc).strip().splitlines() or [""])[0]
    if len(line) > limit:
        line = line[:limit] + "..."
    return f"{type(exc).__name__}: {line}"


def release_cached_memory() -> None:
    """After an OOM: hand CUDA's cached blocks back, so the split halves (and other models
    on the device) start from a defragmented pool. Nothing to do when CUDA never ran."""
    initialized = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    if torch.cuda.is_available() and initialized:
        torch.cuda.empty_cache()
