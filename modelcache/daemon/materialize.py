"""Stage 3 of a load: build the module on its device and give it the checkpoint's tensors.

The module is constructed directly on the target device and dtype with transformers'
``no_init_weights`` (parameters are allocated, not randomly initialised) — never on the
meta device, so non-persistent buffers (``position_ids``, rotary ``inv_freq``) are
computed by the model's own code on the real device. Checkpoint tensors are then
*assigned* (zero-copy on CPU when dtypes match). Every checkpoint key must land on a
model key and every model key must come from the checkpoint, a tie the config declares,
or an ``allow_missing`` pattern — anything else fails the load, naming the keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import initialization as hf_init

from modelcache.daemon.errors import ModelLoadError
from modelcache.daemon.resolve import PreparedModel

_LEGACY = ((".gamma", ".weight"), (".beta", ".bias"))


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def construct(prepared: PreparedModel, device: torch.device, dtype: torch.dtype) -> Any:
    """The model on ``device`` in ``dtype`` with allocated, uninitialised parameters."""
    with torch.device(device), _default_dtype(dtype), hf_init.no_init_weights():
        return prepared.model_class._from_config(prepared.config, dtype=dtype)  # type: ignore[attr-defined]


def map_keys(ckpt_keys: list[str], model_keys: set[str], prefix: str) -> dict[str, str]:
    """checkpoint key -> model key, trying the layouts transformers itself accepts: as is,
    with the base-model prefix stripped (head checkpoint into a base model) or added
    (base checkpoint into a head model), and legacy gamma/beta names."""

    def candidates(k: str) -> Iterator[str]:
        yield k
        for old, new in _LEGACY:
            if k.endswith(old):
                yield k[: -len(old)] + new

    def layout(transform: Any) -> dict[str, str]:
        out = {}
        for k in ckpt_keys:
            for c in candidates(transform(k)):
                if c in model_keys:
                    out[k] = c
                    break
        return out

    options = [layout(lambda k: k)]
    if prefix:
        p = prefix + "."
        options.append(layout(lambda k: k[len(p):] if k.startswith(p) else k))
        options.append(layout(lambda k: k if k.startswith(p) else p + k))
    return max(options, key=len)


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, key) for p in patterns)


def _tie_hint(keys: list[str], config: Any) -> str:
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any("lm_head" in k for k in keys) and not getattr(text_cfg, "tie_word_embeddings", True):
        return (" — the config says tie_word_embeddings=false but the checkpoint has no "
                "lm_head: it was saved tied. Set tie_word_embeddings accordingly")
    return ""


def assign_weights(model: Any, prepared: PreparedModel, ckpt: dict[str, torch.Tensor],
                   device: torch.device) -> dict[str, str]:
    """Assign checkpoint tensors to the model; return model key -> checkpoint key."""
    spec = prepared.spec
    state = model.state_dict(keep_vars=True)
    model_keys = set(state)
    non_persistent = {n for n, _ in model.named_buffers()} - model_keys
    mapping = map_keys(list(ckpt), model_keys, getattr(model, "base_model_prefix", "") or "")
    unexpected = [k for k in ckpt if k not in mapping and not _matches(k, spec.allow_unexpected)
                  and k.split(".", 1)[-1] not in non_persistent and k not in non_persistent]
    if unexpected:
        raise ModelLoadError(
            "unexpected_weights",
            f"checkpoint keys the {type(model).__name__} has no place for: "
            f"{', '.join(sorted(unexpected)[:8])}{' ...' if len(unexpected) > 8 else ''} "
            "(wrong task or architecture? list them in allow_unexpected to ignore them)",
        )
    new_state: dict[str, torch.Tensor] = {}
    for ckey, mkey in mapping.items():
        src, dst = ckpt[ckey], state[mkey]
        if tuple(src.shape) != tuple(dst.shape):
            raise ModelLoadError(
                "corrupt_weights",
                f"{ckey}: checkpoint shape {list(src.shape)} != model shape "
                f"{list(dst.shape)} (config does not match weights)",
            )
        if src.device != device:
            src = src.to(device, non_blocking=True)
        new_state[mkey] = src.to(dst.dtype) if src.dtype != dst.dtype else src
    model.load_state_dict(new_state, strict=False, assign=True)
    model.tie_weights()
    _resolve_missing(model, prepared, {mapping[k]: k for k in mapping})
    return {m: c for c, m in mapping.items()}


def _resolve_missing(model: Any, prepared: PreparedModel, loaded: dict[str, str]) -> None:
    """Every model key not loaded must be tied to a loaded one or explicitly allowed."""
    state = model.state_dict(keep_vars=True)
    loaded_ptrs = {state[k].data_ptr() for k in loaded}
    missing = [k for k, t in state.items() if k not in loaded and t.data_ptr() not in loaded_ptrs]
    forbidden = [k for k in missing if not _matches(k, prepared.spec.allow_missing)]
    if forbidden:
        raise ModelLoadError(
            "missing_weights",
            f"model keys absent from the checkpoint: {', '.join(sorted(forbidden)[:8])}"
            f"{' ...' if len(forbidden) > 8 else ''}{_tie_hint(forbidden, prepared.config)} "
            "(they would be random; list them in allow_missing only if that is intended, "
            "e.g. a new classification head)",
        )
    if not missing:
        return
    # Allowed-missing tensors get the model's own initialisation; loaded ones are flagged
    # so transformers' guarded init functions leave them alone.
    for k, t in state.items():
        if k in loaded:
            t._is_hf_initialized = True  # type: ignore[attr-defined]
    owners = {k.rsplit(".", 1)[0] if "." in k else "" for k in missing}
    for name in owners:
        module = model.get_submodule(name)
        for p in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if not getattr(p, "_is_hf_initialized", False):
                with torch.no_grad():
                    p.zero_()  # defined values even if _init_weights skips this tensor
        model._init_weights(module)
