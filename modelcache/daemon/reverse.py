"""The reverse conversion, for verification: the value a checkpoint tensor has *in the live
model*, at any flat position of the checkpoint tensor.

The fingerprint (verify) compares samples re-read from the files with the live model. For
a renamed tensor the live counterpart is a model tensor; for a converted one (an expert
slice of a fused MoE tensor, the q part of a fused QKV) it is spread over model tensors.
Walking the plan's pieces backwards maps each sampled checkpoint position to the model
element it became, so a slice written to the wrong expert or the wrong half of
``gate_up_proj`` is caught the same way a bad read is — without re-assembling any
checkpoint tensor (no temporary the size of a weight).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from modelcache.daemon.conversion import Piece, Plan, full, region_shape
from modelcache.daemon.errors import ModelLoadError

#: Samples of one checkpoint tensor at the given flat indices, as the live model holds them.
Sampler = Callable[[list[int]], torch.Tensor]


def _unravel(flat: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for d in reversed(shape):
        flat, r = divmod(flat, d) if d else (flat, 0)
        out.append(r)
    return out[::-1]


def _ravel(pos: list[int], shape: tuple[int, ...]) -> int:
    flat = 0
    for x, d in zip(pos, shape, strict=True):
        flat = flat * d + x
    return flat


def _sampler(
    ckey: str, shape: tuple[int, ...], entries: list[tuple[torch.Tensor, Piece]]
) -> Sampler:
    def take(indices: list[int]) -> torch.Tensor:
        # per model tensor: (positions in the output, multi-indices into that tensor)
        gathers: dict[int, tuple[torch.Tensor, list[int], list[list[int]]]] = {}
        for out_pos, flat in enumerate(indices):
            pos = _unravel(flat, shape)
            for n, (tensor, p) in enumerate(entries):
                if all(a <= x < b for x, (a, b) in zip(pos, p.src, strict=True)):
                    local = _ravel(
                        [x - a for x, (a, _) in zip(pos, p.src, strict=True)], region_shape(p.src)
                    )
                    dpos = _unravel(local, region_shape(p.dst))
                    at = [a + x for x, (a, _) in zip(dpos, p.dst, strict=True)]
                    slot = gathers.setdefault(n, (tensor, [], []))
                    slot[1].append(out_pos)
                    slot[2].append(at)
                    break
            else:
                raise ModelLoadError(
                    "verify_failed", f"{ckey}: position {pos} went nowhere in the model"
                )
        first = entries[0][0]
        out = torch.empty(len(indices), dtype=first.dtype)
        for tensor, where, positions in gathers.values():
            cols = torch.tensor(positions, dtype=torch.long, device=tensor.device).T
            out[torch.tensor(where)] = tensor.detach()[tuple(cols)].cpu().to(first.dtype)
        return out

    return take


def live_views(
    plan: Plan, live: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor | Sampler]:
    """Checkpoint key -> its live counterpart: the model tensor itself for a plain rename,
    a sampler through the pieces for a converted tensor."""
    out: dict[str, torch.Tensor | Sampler] = {}
    for ckey, uses in plan.sources().items():
        shape = shapes[ckey]
        if len(uses) == 1 and uses[0][1].src == full(shape) and uses[0][1].dst == full(shape):
            out[ckey] = live[uses[0][0]]
            continue
        if math.prod(shape) == 0:
            out[ckey] = torch.empty(shape, dtype=live[uses[0][0]].dtype)
            continue
        out[ckey] = _sampler(ckey, shape, [(live[mkey], p) for mkey, p in uses])
    return out
