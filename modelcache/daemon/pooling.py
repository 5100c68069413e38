"""Sentence vectors from hidden states: pooling and Dense projections, as
sentence-transformers computes them, so a checkpoint served here gives the vectors it was
trained to give (the modes and layers come from daemon.stmodules).

Pooling runs in float32 over right-padded batches (real tokens first, so "last" is the
mask's length and weightedmean's position weights start at 1 for every row); the Dense
layers run in the model's dtype, as they do after ``SentenceTransformer.to(dtype)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from modelcache.daemon.stmodules import DenseLayer

__all__ = ["pool", "project"]


def _pool_one(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "max":
        return hidden.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).amax(dim=1)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "weightedmean":  # position weights 1..T (right padding: real tokens first)
        steps = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
        weights = weights * steps.view(1, -1, 1)
    total = (hidden * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp_min(1e-9)
    if mode in ("mean", "weightedmean"):
        return total / count
    if mode == "mean_sqrt_len_tokens":
        return total / count.sqrt()
    raise ValueError(f"unknown pooling mode {mode!r}")


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str | Sequence[str]) -> torch.Tensor:
    """[B, T, D] hidden states → [B, D x modes], ignoring padding, as sentence-transformers'
    Pooling computes each mode (several modes are concatenated in the order given)."""
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    parts = [_pool_one(hidden, mask, m) for m in modes]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Identity": lambda x: x,
    "Tanh": torch.tanh,
    "ReLU": torch.relu,
    "GELU": torch.nn.functional.gelu,
    "Sigmoid": torch.sigmoid,
    "SiLU": torch.nn.functional.silu,
}


def project(x: torch.Tensor, layers: Sequence[DenseLayer]) -> torch.Tensor:
    """The checkpoint's Dense modules, in order, in the weights' dtype (the model's)."""
    for d in layers:
        x = x.to(d.weight.dtype)
        y = _ACTIVATIONS[d.activation](torch.nn.functional.linear(x, d.weight, d.bias))
        if d.use_residual:
            y = y + (x if d.residual is None else torch.nn.functional.linear(x, d.residual))
        x = y
    return x
