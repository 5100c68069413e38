"""Refusing quantized checkpoints: modelcache serves weights exactly as stored, and a
quantized tensor is not a weight until it is dequantized with its scales.

Measured (issue 11): an FP8 checkpoint whose ``weight_scale_inv`` tensors were waved
through with ``allow_unexpected`` loaded with its raw FP8 values cast to float (|w| up to
448 instead of 0.078), and fingerprint and canary passed. So the refusal does not depend
on the allow lists: a ``quantization_config`` in config.json, any FP8 tensor, and any
integer tensor headed for a floating parameter (or for nowhere, as packed GPTQ/AWQ/bnb
weights are) fail the load with the class ``unsupported_quantization``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from modelcache.daemon.errors import ModelLoadError
from modelcache.daemon.weights import Shard

#: config.json fields that declare quantized weights (compression_config: older
#: compressed-tensors checkpoints).
_CONFIG_FIELDS = ("quantization_config", "compression_config")
_FP8 = {torch.float8_e4m3fn, torch.float8_e5m2}
#: Storage dtypes of packed/quantized weights (int8/uint8: bitsandbytes, MXFP4 blocks and
#: scales, int8 compressed-tensors; int32: GPTQ/AWQ qweight/qzeros; int16: some packers).
#: int64 and bool are left out: checkpoints carry position_ids / masks in them.
PACKED = _FP8 | {torch.int8, torch.uint8, torch.int16, torch.int32}


def _refuse(message: str) -> ModelLoadError:
    return ModelLoadError(
        "unsupported_quantization",
        f"{message}; modelcache serves unquantized weights only (float32/float16/bfloat16) and "
        "no allow_missing/allow_unexpected setting changes that: use the unquantized checkpoint",
    )


def _declared(cfg: Any, where: str) -> Iterable[str]:
    if isinstance(cfg, dict):
        for name in _CONFIG_FIELDS:
            if cfg.get(name):
                method = cfg[name].get("quant_method", "?") if isinstance(cfg[name], dict) else "?"
                yield f"{where}{name} (quant_method {method})"
        for key, sub in cfg.items():
            if isinstance(sub, dict) and key.endswith("_config") and key not in _CONFIG_FIELDS:
                yield from _declared(sub, f"{where}{key}.")


def check_config(path: Path, hf_config: Any) -> None:
    """A checkpoint that declares quantization, in config.json or any sub-config."""
    found: list[str] = []
    with contextlib.suppress(OSError, ValueError):  # unreadable: transformers failed on it
        found += list(_declared(json.loads((path / "config.json").read_text()), ""))
    for name in _CONFIG_FIELDS:
        if getattr(hf_config, name, None) and not any(name in f for f in found):
            found.append(name)
    if found:
        raise _refuse(f"{path}/config.json declares quantized weights: {', '.join(found)}")


def check_headers(shards: Iterable[Shard]) -> None:
    """FP8 tensors: no model parameter modelcache builds is FP8, so they are quantized
    weights whatever their names."""
    fp8 = [f"{t.name} ({t.dtype})" for s in shards for t in s.tensors if t.dtype in _FP8]
    if fp8:
        more = f" and {len(fp8) - 4} more" if len(fp8) > 4 else ""
        raise _refuse(f"the checkpoint holds FP8 tensors: {', '.join(fp8[:4])}{more}")


def check_destinations(
    dtypes: Mapping[str, torch.dtype],
    destinations: Mapping[str, torch.Tensor | None],
) -> None:
    """``dtypes``: checkpoint key -> stored dtype; ``destinations``: checkpoint key -> the
    model tensor it fills (None: no place in the model). A non-floating tensor may only
    fill a non-floating one (ids, masks); a packed dtype with no place is a quantized
    weight or its scales/zeros under a name the model does not have."""
    bad = []
    for key, dtype in dtypes.items():
        dest = destinations.get(key)
        if dest is None:
            if dtype in PACKED:
                bad.append(f"{key} ({dtype}, no such model tensor)")
        elif dest.is_floating_point() and (not dtype.is_floating_point or dtype in _FP8):
            bad.append(f"{key} ({dtype} into a {dest.dtype} parameter)")
    if bad:
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise _refuse(f"quantized or integer tensors in the checkpoint: {', '.join(bad[:4])}{more}")
