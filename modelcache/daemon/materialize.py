"""Stage 3 of a load: build the module and give it the checkpoint's tensors.

The module is constructed on the CPU in float32 with transformers' ``no_init_weights``:
parameters are allocated but never touched (the kernel backs untouched pages lazily, so
this costs address space, not memory or time), and non-persistent buffers
(``position_ids``, rotary ``inv_freq``, GPT-J's sinusoidal table) are computed by the
model's own code exactly as ``from_pretrained`` computes them — never on the meta
device. Checkpoint tensors are then converted straight to the target device and dtype
and *assigned* (zero-copy on CPU when dtypes match), so the device never holds a second
copy of the model. Buffers follow to the device keeping their dtype.

Every checkpoint key must land on one model key and every model key must come from the
checkpoint, a tie the config declares, or an ``allow_missing`` pattern; anything else
fails the load, naming the keys.
"""

from __future__ import annotations

import re
from collections import defaultdict
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


def construct(prepared: PreparedModel) -> Any:
    """The model on the CPU in float32, parameters allocated but uninitialised."""
    with torch.device("cpu"), _default_dtype(torch.float32), hf_init.no_init_weights():
        return prepared.model_class._from_config(  # type: ignore[attr-defined]
            prepared.config, dtype=torch.float32
        )


def param_dtypes(model: Any, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Target dtype of every floating parameter/persistent buffer, honouring the model's
    ``_keep_in_fp32_modules`` (fp16 only) and ``_keep_in_fp32_modules_strict`` (fp16/bf16),
    as from_pretrained does."""
    keep: set[str] = set()
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if t.is_floating_point():
            fp32 = any(re.search(rf"(^|\.){re.escape(k)}(\.|$)", key) for k in keep)
            out[key] = torch.float32 if fp32 else dtype
    return out


def map_keys(ckpt_keys: list[str], model_keys: set[str], prefix: str) -> dict[str, str]:
    """checkpoint key -> model key, trying the layouts transformers itself accepts: as is,
    with the base-model prefix stripped (head checkpoint into a base model) or added
    (base checkpoint into a head model), and legacy LayerNorm gamma/beta names."""

    def candidates(k: str) -> Iterator[str]:
        yield k
        for old, new in _LEGACY:
            if k.endswith(old) and "LayerNorm" in k:
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
        options.append(layout(lambda k: k[len(p) :] if k.startswith(p) else k))
        options.append(layout(lambda k: k if k.startswith(p) else p + k))
    return max(options, key=len)


def _matches(key: str, patterns: Any) -> bool:
    return any(re.search(p, key) for p in patterns or ())


def _tie_hint(keys: list[str], config: Any) -> str:
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any("lm_head" in k for k in keys) and not getattr(text_cfg, "tie_word_embeddings", True):
        return (
            " — the config says tie_word_embeddings=false but the checkpoint has no "
            "lm_head: it was saved tied. Set tie_word_embeddings accordingly"
        )
    return ""


def _check_keys(
    model: Any, prepared: PreparedModel, ckpt: dict[str, torch.Tensor], mapping: dict[str, str]
) -> None:
    spec = prepared.spec
    model_keys = set(model.state_dict(keep_vars=True))
    non_persistent = {n for n, _ in model.named_buffers()} - model_keys
    ignored = getattr(model, "_keys_to_ignore_on_load_unexpected", None)
    unexpected = [
        k
        for k in ckpt
        if k not in mapping
        and not _matches(k, spec.allow_unexpected)
        and not _matches(k, ignored)
        and k not in non_persistent
        and k.split(".", 1)[-1] not in non_persistent
    ]
    if unexpected:
        raise ModelLoadError(
            "unexpected_weights",
            f"checkpoint keys the {type(model).__name__} has no place for: "
            f"{', '.join(sorted(unexpected)[:8])}{' ...' if len(unexpected) > 8 else ''} "
            "(wrong task or architecture? list them in allow_unexpected to ignore them)",
        )
    seen: dict[str, str] = {}
    for ckey, mkey in mapping.items():
        if mkey in seen:
            raise ModelLoadError(
                "corrupt_weights",
                f"checkpoint keys {seen[mkey]!r} and {ckey!r} both map to {mkey!r}",
            )
        seen[mkey] = ckey


def _release_shards(new_state: dict[str, torch.Tensor], ckpt: dict[str, torch.Tensor]) -> None:
    """Zero-copy views keep their whole shard buffer alive. Where a shard is mostly not
    kept (converted dtypes, ignored keys), copy the few views out so it can be freed."""
    storage_bytes: dict[int, int] = {}
    kept: dict[int, list[str]] = defaultdict(list)
    for t in ckpt.values():
        s = t.untyped_storage()
        storage_bytes[s.data_ptr()] = s.nbytes()
    for key, t in new_state.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in storage_bytes:
            kept[ptr].append(key)
    for ptr, keys in kept.items():
        used = sum(new_state[k].numel() * new_state[k].element_size() for k in keys)
        if used < 0.9 * storage_bytes[ptr]:
            for k in keys:
                new_state[k] = new_state[k].clone()


def assign_weights(
    model: Any,
    prepared: PreparedModel,
    ckpt: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, str]:
    """Move the checkpoint into the model on ``device``; return model key -> checkpoint key."""
    state = model.state_dict(keep_vars=True)
    mapping = map_keys(list(ckpt), set(state), getattr(model, "base_model_prefix", "") or "")
    _check_keys(model, prepared, ckpt, mapping)
    targets = param_dtypes(model, dtype)
    new_state: dict[str, torch.Tensor] = {}
    for ckey, mkey in mapping.items():
        src, dst = ckpt[ckey], state[mkey]
        if tuple(src.shape) != tuple(dst.shape):
            raise ModelLoadError(
                "corrupt_weights",
                f"{ckey}: checkpoint shape {list(src.shape)} != model shape "
                f"{list(dst.shape)} (config does not match weights)",
            )
        want = targets.get(mkey, dst.dtype)
        if src.device != device:  # copy in the checkpoint dtype, convert on the device
            src = src.to(device, non_blocking=True)
        new_state[mkey] = src.to(want) if src.dtype != want else src
    if device.type == "cpu":
        _release_shards(new_state, ckpt)
    model.load_state_dict(new_state, strict=False, assign=True)
    loaded = {m: c for c, m in mapping.items()}
    _place_the_rest(model, loaded, targets, device)
    model.tie_weights()
    _resolve_missing(model, prepared, loaded)
    _set_config_dtype(model.config, dtype)
    return loaded


def _place_the_rest(
    model: Any, loaded: dict[str, str], targets: dict[str, torch.dtype], device: torch.device
) -> None:
    """Tensors not from the checkpoint: buffers move to the device keeping their dtype;
    parameters get fresh storage on the device (initialised later if allowed missing)."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    for key, p in model.named_parameters(remove_duplicate=False):
        if key in loaded or p.device == device:
            continue
        owner, _, leaf = key.rpartition(".")
        module = model.get_submodule(owner)
        fresh = torch.empty(p.shape, dtype=targets.get(key, p.dtype), device=device)
        module._parameters[leaf] = torch.nn.Parameter(fresh, requires_grad=p.requires_grad)


def _set_config_dtype(config: Any, dtype: torch.dtype) -> None:
    config.dtype = dtype
    for sub in getattr(config, "sub_configs", {}) or {}:
        if (c := getattr(config, sub, None)) is not None:
            c.dtype = dtype


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
