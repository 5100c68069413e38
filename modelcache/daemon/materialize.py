"""Stage 3 of a load: build the module and give it the checkpoint's tensors.

The module is constructed on the CPU in float32 with transformers' ``no_init_weights``:
parameters are allocated but never touched (the kernel backs untouched pages lazily, so
this costs address space, not memory or time), and non-persistent buffers
(``position_ids``, rotary ``inv_freq``, GPT-J's sinusoidal table) are computed by the
model's own code exactly as ``from_pretrained`` computes them — never on the meta
device. Checkpoint tensors are then converted straight to the target device and dtype
and *assigned* (zero-copy on CPU when dtypes match), so the device never holds a second
copy of the model. Buffers follow to the device keeping their dtype.

A streaming load (streaming.py) builds with ``construct_on`` instead: each parameter is
allocated once, on the target device in its target dtype, as the module registers it, and
``destinations`` hands the streaming fill the tensors to write into in place; both paths
end with ``finish`` (buffers to the device, ties, missing keys).

Where each checkpoint tensor goes is planned beforehand (conversion: transformers' renames
and fusions, checked in keys); every model key must come from the checkpoint, a tie the
config declares, or an ``allow_missing`` pattern; anything else fails the load, naming the
keys.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import initialization as hf_init

from modelcache.daemon import keys
from modelcache.daemon.conversion import Plan, full, index, region_shape
from modelcache.daemon.resolve import PreparedModel


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


@contextmanager
def _parameters_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """While a model is built, every parameter a module registers is replaced by fresh,
    uninitialised storage on ``device`` (floating ones in ``dtype``) before it is kept.

    Why: building on the target device under a ``dtype`` default changes how the model's
    own code computes its buffers (measured: GPT-J's sinusoidal table differs in float32
    after a bfloat16 build, Gemma's ``embed_scale`` becomes bfloat16), and building in
    float32 allocates 4 bytes per parameter. Here buffers are computed on the CPU in
    float32 exactly as ``construct`` computes them, while each float32 parameter exists
    only for the instant between its creation (untouched pages: address space, no memory)
    and its registration. Runs under LOAD_LOCK; the class attribute is restored on exit
    and globalstate checks it around every load."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: Any) -> None:
        want = dtype if param is not None and param.is_floating_point() else None
        if param is not None and (param.device != device or (want and param.dtype != want)):
            fresh = torch.empty(param.shape, dtype=want or param.dtype, device=device)
            param = torch.nn.Parameter(fresh, requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def construct_on(prepared: PreparedModel, device: torch.device, dtype: torch.dtype) -> Any:
    """The model with its parameters allocated once, uninitialised, on ``device`` in
    ``dtype``; buffers as ``construct`` computes them (moved by ``finish``). Never meta."""
    with (
        torch.device("cpu"),
        _default_dtype(torch.float32),
        hf_init.no_init_weights(),
        _parameters_on(device, dtype),
    ):
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
    for ptr, names in kept.items():
        used = sum(new_state[k].numel() * new_state[k].element_size() for k in names)
        if used < 0.9 * storage_bytes[ptr]:
            for k in names:
                new_state[k] = new_state[k].clone()


def _convert(src: torch.Tensor, device: torch.device, want: torch.dtype) -> torch.Tensor:
    if src.device != device:  # copy in the checkpoint dtype, convert on the device
        src = src.to(device, non_blocking=True)
    return src.to(want) if src.dtype != want else src


def fill(
    model: Any,
    plan: Plan,
    ckpt: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The model's new tensors on ``device``: a renamed checkpoint tensor is converted (or
    kept as a zero-copy view of its shard); a fused one (MoE experts) is allocated once and
    written slice by slice, so no full-size temporary of it ever exists."""
    state = model.state_dict(keep_vars=True)
    targets = param_dtypes(model, dtype)
    out: dict[str, torch.Tensor] = {}
    for mkey, pieces in plan.targets.items():
        dst = state[mkey]
        want = targets.get(mkey, dst.dtype)
        if len(pieces) == 1 and pieces[0].dst == full(tuple(dst.shape)):
            p = pieces[0]
            src = ckpt[p.ckey][index(p.src)].reshape(dst.shape)  # a view where it can be
            out[mkey] = _convert(src, device, want)
            continue
        fused = torch.empty(dst.shape, dtype=want, device=device)
        for p in pieces:
            part = ckpt[p.ckey][index(p.src)].reshape(region_shape(p.dst))
            fused[index(p.dst)].copy_(part, non_blocking=True)
        out[mkey] = fused
    return out


def assign_weights(
    model: Any,
    prepared: PreparedModel,
    plan: Plan,
    ckpt: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Give the model the checkpoint's tensors on ``device`` by ``plan`` (already checked,
    see keys.check_plan), tie, and fail on any model key that came from nowhere."""
    new_state = fill(model, plan, ckpt, device, dtype)
    if device.type == "cpu":
        _release_shards(new_state, ckpt)
    shapes = {k: tuple(t.shape) for k, t in ckpt.items()}
    model.load_state_dict(new_state, strict=False, assign=True)
    del new_state
    finish(model, prepared, plan, shapes, device, dtype)


def finish(
    model: Any,
    prepared: PreparedModel,
    plan: Plan,
    shapes: dict[str, tuple[int, ...]],
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """After the checkpoint's tensors are in place (either path): the rest to the device,
    ties, and a failure for any model key that came from nowhere."""
    _place_the_rest(model, set(plan.targets), param_dtypes(model, dtype), device)
    model.tie_weights()
    keys.resolve_missing(model, prepared, plan, shapes)
    _set_config_dtype(model.config, dtype)


def destinations(
    model: Any, plan: Plan, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Model key -> the tensor the streaming fill writes into, in place: the parameter or
    buffer itself where it already has its place and dtype, else fresh storage put in its
    place (``_keep_in_fp32_modules``, persistent buffers still on the CPU)."""
    targets = param_dtypes(model, dtype)
    state = model.state_dict(keep_vars=True)
    out: dict[str, torch.Tensor] = {}
    for mkey in plan.targets:
        t = state[mkey]
        want = targets.get(mkey, t.dtype)
        if t.device != device or t.dtype != want or not t.is_contiguous():
            owner, _, leaf = mkey.rpartition(".")
            module = model.get_submodule(owner)
            fresh = torch.empty(t.shape, dtype=want, device=device)
            if leaf in module._parameters:
                t = torch.nn.Parameter(fresh, requires_grad=t.requires_grad)
                module._parameters[leaf] = t
            else:
                module._buffers[leaf] = t = fresh
        out[mkey] = t.detach()
    return out


def _place_the_rest(
    model: Any, loaded: set[str], targets: dict[str, torch.dtype], device: torch.device
) -> None:
    """Tensors not from the checkpoint: buffers move to the device keeping their dtype;
    parameters get fresh storage on the device in their target dtype (initialised later
    if allowed missing) unless they already have it (built there by ``construct_on``)."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    for key, p in model.named_parameters(remove_duplicate=False):
        if key in loaded or (p.device == device and p.dtype == targets.get(key, p.dtype)):
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
