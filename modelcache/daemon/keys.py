"""Strict keys on the converted plan: every checkpoint tensor lands somewhere, every model
tensor comes from somewhere, or the load fails naming the keys.

The checks run on the plan (after transformers' renames and fusions), so a Pythia
``embed_out`` or a Mixtral per-expert key is judged by where it goes, not by its raw name.
Quantized tensors are refused before the allow lists are consulted (see quantization).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from modelcache.daemon import quantization
from modelcache.daemon.conversion import Plan
from modelcache.daemon.errors import ModelLoadError
from modelcache.daemon.resolve import PreparedModel
from modelcache.daemon.weights import TensorInfo


def matches(key: str, patterns: Any) -> bool:
    return any(re.search(p, key) for p in patterns or ())


def _non_persistent(model: Any) -> dict[str, torch.Tensor]:
    persistent = set(model.state_dict(keep_vars=True))
    return {n: b for n, b in model.named_buffers() if n not in persistent}


def _buffer_for(key: str, buffers: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The non-persistent buffer an unmapped checkpoint key names (old checkpoints saved
    ``position_ids``), with or without the base-model prefix."""
    return buffers.get(key) if key in buffers else buffers.get(key.split(".", 1)[-1])


def check_plan(
    model: Any, prepared: PreparedModel, plan: Plan, infos: Mapping[str, TensorInfo]
) -> None:
    """Refuse quantized tensors, then checkpoint keys the model has no place for."""
    state = model.state_dict(keep_vars=True)
    buffers = _non_persistent(model)
    destinations: dict[str, torch.Tensor | None] = {k: _buffer_for(k, buffers) for k in infos}
    for mkey, pieces in plan.targets.items():
        for p in pieces:
            destinations[p.ckey] = state[mkey]
    for mkey, ckeys, _ in plan.mismatched:
        destinations.update(dict.fromkeys(ckeys, state[mkey]))
    quantization.check_destinations({k: i.dtype for k, i in infos.items()}, destinations)
    if plan.mismatched:
        raise ModelLoadError("corrupt_weights", plan.mismatched[0][2])
    ignored = getattr(model, "_keys_to_ignore_on_load_unexpected", None)
    unexpected = [
        k
        for k in plan.unmapped
        if not matches(k, prepared.spec.allow_unexpected)
        and not matches(k, ignored)
        and _buffer_for(k, buffers) is None
    ]
    if unexpected:
        raise ModelLoadError(
            "unexpected_weights",
            f"checkpoint keys the {type(model).__name__} has no place for: "
            f"{', '.join(sorted(unexpected)[:8])}{' ...' if len(unexpected) > 8 else ''} "
            "(wrong task or architecture? list them in allow_unexpected to ignore them)",
        )


def _tie_hint(
    keys: list[str],
    prepared: PreparedModel,
    model_shapes: Mapping[str, tuple[int, ...]],
    ckpt_shapes: Mapping[str, tuple[int, ...]],
    plan: Plan,
) -> str:
    """Why a key is missing. A checkpoint tensor left unused with the missing key's shape is
    most likely that key under another name: tying would serve the wrong weights (measured:
    Pythia's ``embed_out`` allowed as unexpected + tied lm_head = the input embedding)."""
    for key in keys:
        same = [c for c in plan.unmapped if ckpt_shapes.get(c) == model_shapes[key]]
        if same:
            return (
                f" — unused checkpoint tensor(s) {', '.join(same[:3])} have the shape of {key} "
                f"{list(model_shapes[key])}: probably the same weight under another name; do not "
                "tie or allow it, the checkpoint's layout is not the model's"
            )
    config = prepared.config
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any("lm_head" in k for k in keys) and not getattr(text_cfg, "tie_word_embeddings", True):
        return (
            " — the config says tie_word_embeddings=false but the checkpoint has no "
            "lm_head: it was saved tied. Set tie_word_embeddings accordingly"
        )
    return ""


def resolve_missing(
    model: Any, prepared: PreparedModel, plan: Plan, ckpt_shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """Every model key not loaded must be tied to a loaded one or explicitly allowed."""
    state = model.state_dict(keep_vars=True)
    loaded = set(plan.targets)
    loaded_ptrs = {state[k].data_ptr() for k in loaded}
    missing = [k for k, t in state.items() if k not in loaded and t.data_ptr() not in loaded_ptrs]
    forbidden = [k for k in missing if not matches(k, prepared.spec.allow_missing)]
    if forbidden:
        shapes = {k: tuple(state[k].shape) for k in forbidden}
        raise ModelLoadError(
            "missing_weights",
            f"model keys absent from the checkpoint: {', '.join(sorted(forbidden)[:8])}"
            f"{' ...' if len(forbidden) > 8 else ''}"
            f"{_tie_hint(sorted(forbidden), prepared, shapes, ckpt_shapes, plan)} "
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
