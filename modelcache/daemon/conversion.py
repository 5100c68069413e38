"""Checkpoint keys -> model keys, planned from the safetensors headers with transformers'
own conversion mapping (renames, per-expert MoE tensors fused, fused QKV split).

Why plan instead of calling transformers' ``convert_and_load_state_dict_in_model``: that
function materialises every converted tensor with ``torch.stack``/``torch.cat`` (a full
temporary per fused tensor), and it reports unmatched keys as warnings. Here the same
``WeightRenaming``/``WeightConverter`` list (``get_model_conversion_mapping``) and the same
key renaming (``rename_source_key``) decide where every checkpoint tensor goes, but the
operations are interpreted symbolically: each one turns into *pieces*, "this region of
checkpoint tensor K is that region of model tensor M". The fill then writes fused tensors
slice by slice into preallocated memory, strict key checks run on the converted plan, and
the fingerprint walks the pieces backwards (verify each checkpoint tensor against the
model slices it became). An operation without a symbolic form here is refused, never
approximated.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    Chunk,
    Concatenate,
    MergeModulelist,
    Split,
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
)

from modelcache.daemon.errors import ModelLoadError

Region = tuple[tuple[int, int], ...]  # (start, stop) per dimension


def full(shape: tuple[int, ...]) -> Region:
    return tuple((0, d) for d in shape)


def region_shape(region: Region) -> tuple[int, ...]:
    return tuple(b - a for a, b in region)


def index(region: Region) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in region)


@dataclass(frozen=True)
class Piece:
    """``model[mkey][dst] = ckpt[ckey][src].reshape(shape of dst)`` (row-major order kept)."""

    ckey: str
    src: Region
    dst: Region


@dataclass
class Plan:
    """Where every checkpoint tensor goes. ``targets``: model key -> the pieces that fill it
    completely; ``unmapped``: checkpoint keys with no place in the model (after conversion);
    ``renamed``: what each checkpoint key was renamed to (for messages)."""

    targets: dict[str, list[Piece]] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    #: (model key, checkpoint keys, message): shapes that do not match. Reported after the
    #: quantization check, which explains a packed tensor better than its shape does.
    mismatched: list[tuple[str, list[str], str]] = field(default_factory=list)

    def sources(self) -> dict[str, list[tuple[str, Piece]]]:
        """Checkpoint key -> (model key, piece) for every piece it contributes."""
        out: dict[str, list[tuple[str, Piece]]] = defaultdict(list)
        for mkey, pieces in self.targets.items():
            for p in pieces:
                out[p.ckey].append((mkey, p))
        return dict(out)

    def is_direct(self, mkey: str, ckpt_shape: tuple[int, ...]) -> bool:
        """One checkpoint tensor, whole, is the whole model tensor (a plain rename)."""
        pieces = self.targets[mkey]
        return len(pieces) == 1 and pieces[0].src == full(ckpt_shape)


# A symbolic tensor: its shape and the pieces (regions of this tensor) that make it up.
_Value = tuple[tuple[int, ...], list[Piece]]


def _raw(ckey: str, shape: tuple[int, ...]) -> _Value:
    """A checkpoint tensor as it is: one piece, whole."""
    return shape, [Piece(ckey, full(shape), full(shape))]


def _unsupported(op: Any, model: Any) -> ModelLoadError:
    return ModelLoadError(
        "bad_config",
        f"{type(model).__name__}: transformers converts this checkpoint with {op!r}, which "
        "modelcache cannot apply exactly; convert the checkpoint to the model's own layout",
    )


def _merge(values: list[_Value], dim: int, conv: WeightConverter) -> _Value:
    shapes = {v[0] for v in values}
    if len(shapes) != 1:
        raise ModelLoadError(
            "corrupt_weights",
            f"{conv.source_patterns}: per-expert tensors of different shapes {sorted(shapes)}",
        )
    shape = shapes.pop()
    out = [
        Piece(p.ckey, p.src, (*p.dst[:dim], (i, i + 1), *p.dst[dim:]))
        for i, (_, pieces) in enumerate(values)
        for p in pieces
    ]
    return (*shape[:dim], len(values), *shape[dim:]), out


def _concat(values: list[_Value], dim: int) -> _Value:
    offset, out = 0, []
    shape = values[0][0]
    for vshape, pieces in values:
        if len(vshape) != len(shape) or any(
            a != b for d, (a, b) in enumerate(zip(vshape, shape, strict=True)) if d != dim
        ):
            raise ModelLoadError("corrupt_weights", f"cannot concatenate shapes {vshape}, {shape}")
        for p in pieces:
            dst = list(p.dst)
            dst[dim] = (dst[dim][0] + offset, dst[dim][1] + offset)
            out.append(Piece(p.ckey, p.src, tuple(dst)))
        offset += vshape[dim]
    return (*shape[:dim], offset, *shape[dim + 1 :]), out


def _split(value: _Value, dim: int, sizes: list[int], targets: list[str]) -> dict[str, _Value]:
    shape, pieces = value
    if len(pieces) != 1 or sum(sizes) != shape[dim]:
        raise ModelLoadError(
            "corrupt_weights", f"cannot split a tensor of shape {list(shape)} into {sizes}"
        )
    (p,) = pieces
    out, start = {}, 0
    for target, size in zip(targets, sizes, strict=True):
        src = list(p.src)
        src[dim] = (src[dim][0] + start, src[dim][0] + start + size)
        part = (*shape[:dim], size, *shape[dim + 1 :])
        out[target] = (part, [Piece(p.ckey, tuple(src), full(part))])
        start += size
    return out


def _expert_order(pattern: str, keys: list[str]) -> None:
    """Per-expert keys are stacked in sorted order; check that order is 0..n-1 so a gap
    (expert 3 missing, expert 4 present) cannot shift experts into the wrong slots."""
    rx = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)"))
    for i, key in enumerate(keys):
        m = rx.search(key)
        if m and m.groups() and int(m.group(1)) != i:
            raise ModelLoadError(
                "corrupt_weights",
                f"expert tensors for {pattern!r} are not numbered 0..{len(keys) - 1} "
                f"({key} is number {i} in order)",
            )


def _run_converter(
    conv: WeightConverter,
    first_target: str,
    collected: dict[str, list[str]],
    shapes: dict[str, tuple[int, ...]],
    model: Any,
    state: dict[str, torch.Tensor],
) -> dict[str, _Value]:
    """Interpret ``conv.operations`` on symbolic tensors; return model key -> value."""
    values: dict[str, Any] = {}
    for pattern in conv.source_patterns:
        keys = collected.get(pattern, [])
        if keys:
            _expert_order(pattern, keys)
            values[pattern] = [_raw(k, shapes[k]) for k in keys]
    targets = list(conv.target_patterns)
    for op in conv.operations:
        if isinstance(op, MergeModulelist):
            single = len(values) == 1
            if single and len(targets) != 1:
                raise _unsupported(op, model)
            values = {
                (targets[0] if single else pattern): _merge(vals, op.dim, conv)
                for pattern, vals in values.items()
            }
        elif isinstance(op, Concatenate) and len(targets) == 1:
            parts: list[_Value] = []
            for pattern in conv.source_patterns:
                v = values.pop(pattern, None)
                if v is not None:
                    parts.extend(v if isinstance(v, list) else [v])
            values = {targets[0]: _concat(parts, op.dim)}
        elif isinstance(op, (Chunk, Split)) and len(values) == 1:
            (v,) = values.values()
            v = v[0] if isinstance(v, list) and len(v) == 1 else v
            if isinstance(v, list):
                raise _unsupported(op, model)
            if isinstance(op, Chunk):
                names = op.get_target_patterns(targets, config=model.config)
                if v[0][op.dim] % len(names):
                    raise ModelLoadError(
                        "corrupt_weights",
                        f"{first_target}: dimension {op.dim} of {list(v[0])} does not split "
                        f"into {len(names)} equal parts",
                    )
                sizes = [v[0][op.dim] // len(names)] * len(names)
            else:
                names = targets
                sizes = [state[first_target.replace(targets[0], t)].shape[op.dim] for t in names]
            values = _split(v, op.dim, sizes, names)
        else:
            raise _unsupported(op, model)
    out = {}
    for name, v in values.items():
        if isinstance(v, list):
            if len(v) != 1:
                raise _unsupported(conv, model)
            v = v[0]
        out[first_target.replace(targets[0], name, 1)] = v
    return out


def _place(plan: Plan, mkey: str, value: _Value, state: dict[str, torch.Tensor]) -> None:
    shape, pieces = value
    want = tuple(state[mkey].shape)
    if mkey in plan.targets:
        others = sorted({p.ckey for p in plan.targets[mkey]} | {p.ckey for p in pieces})
        raise ModelLoadError(
            "corrupt_weights", f"checkpoint keys {', '.join(others[:4])} all map to {mkey!r}"
        )
    if shape != want:
        ckeys = sorted({p.ckey for p in pieces})
        plan.mismatched.append(
            (
                mkey,
                ckeys,
                f"{', '.join(ckeys[:3])}: checkpoint shape {list(shape)} != model shape "
                f"{list(want)} for {mkey} (config does not match weights)",
            )
        )
        return
    if sum(math.prod(region_shape(p.dst)) for p in pieces) != math.prod(want):
        raise ModelLoadError("corrupt_weights", f"{mkey}: the checkpoint does not fill it")
    plan.targets[mkey] = pieces


def plan_conversion(model: Any, shapes: dict[str, tuple[int, ...]]) -> Plan:
    """Plan every checkpoint key (``shapes``: key -> shape from the headers) onto ``model``
    the way ``from_pretrained`` renames and converts it, checking shapes on the way."""
    state = model.state_dict(keep_vars=True)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = getattr(model, "base_model_prefix", "") or None
    plan = Plan()
    groups: dict[str, tuple[WeightConverter, dict[str, list[str]]]] = {}
    for ckey in sorted(shapes, key=dot_natural_key):
        renamed, pattern = rename_source_key(ckey, renamings, converters, prefix, state)
        if renamed not in state and ckey in state:  # as transformers: keep a key that fits
            renamed, pattern = rename_source_key(ckey, [], [], prefix, state)
        plan.renamed[ckey] = renamed
        if renamed not in state:
            plan.unmapped.append(ckey)
        elif pattern is None:
            _place(plan, renamed, _raw(ckey, shapes[ckey]), state)
        else:
            conv, collected = groups.setdefault(renamed, (by_pattern[pattern], defaultdict(list)))
            collected[pattern].append(ckey)
    for first_target, (conv, collected) in groups.items():
        for mkey, value in _run_converter(
            conv, first_target, collected, shapes, model, state
        ).items():
            if mkey not in state:
                plan.unmapped.extend(sorted({p.ckey for p in value[1]}))
                continue
            _place(plan, mkey, value, state)
    return plan
