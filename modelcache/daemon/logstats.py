"""What a LogProbs request asks for and gets, and the statistics over one slice of logits.

Why the statistics look the way they do: a row of logits is 200 KB to 500 KB of float32,
so it never leaves the device. log_softmax runs in float32 on the device, the observed
token is gathered there, and entropy, E[log p], Var[log p], rank and top-k are reductions
over the vocabulary; only per-position values (and k alternatives) reach the host, packed
into one [N, C] tensor whose column layout is ``layout``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

MAX_TOP_K = 20
F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
#: Columns holding int32 values bit-cast into the float32 result tensor (exact for any
#: vocabulary, unlike a float conversion past 2^24).
INT_KEYS = frozenset({"rank", "top_k_ids"})


@dataclass(frozen=True)
class LogProbsOptions:
    top_k: int = 0
    entropy: bool = False
    expected_logprob: bool = False
    rank: bool = False


@dataclass(frozen=True)
class LogProbsItem:
    ids: list[int]
    options: LogProbsOptions


@dataclass
class SequenceStats:
    """Per-position results for one sequence of n tokens (positions 1..n-1)."""

    token_ids: I32
    logprobs: F32
    entropy: F32 | None = None
    expected_logprob: F32 | None = None
    logprob_variance: F32 | None = None
    rank: I32 | None = None
    top_k_ids: I32 | None = None  # (n-1, k)
    top_k_logprobs: F32 | None = None  # (n-1, k)


def merge_options(items: Sequence[LogProbsItem]) -> LogProbsOptions:
    """What the batch computes: everything any of its items asked for."""
    return LogProbsOptions(
        top_k=max(i.options.top_k for i in items),
        entropy=any(i.options.entropy for i in items),
        expected_logprob=any(i.options.expected_logprob for i in items),
        rank=any(i.options.rank for i in items),
    )


def layout(opts: LogProbsOptions) -> tuple[dict[str, slice], int]:
    """Column ranges of each statistic in the packed result, and the width."""
    widths = {"logprobs": 1}
    if opts.entropy or opts.expected_logprob:
        widths |= {"entropy": 1, "expected_logprob": 1, "logprob_variance": 1}
    if opts.rank:
        widths["rank"] = 1
    if opts.top_k:
        widths |= {"top_k_logprobs": opts.top_k, "top_k_ids": opts.top_k}
    cols, at = {}, 0
    for key, w in widths.items():
        cols[key], at = slice(at, at + w), at + w
    return cols, at


def token_statistics(
    logits: torch.Tensor, targets: torch.Tensor, options: LogProbsOptions
) -> dict[str, torch.Tensor]:
    """Statistics of next-token prediction over ``logits`` [..., V] (any float dtype) whose
    observed next tokens are ``targets`` [...]; results [...] (top-k: [..., k]), on device.

    ``log_softmax(dtype=float32)`` reads the logits in their own dtype (no float32 copy of
    them is kept), and only one vocabulary-sized float32 tensor besides ``p`` ever exists:
    the centring for the variance happens in place.
    """
    lp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    observed = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out = {"logprobs": observed}
    if options.rank:
        out["rank"] = (lp > observed.unsqueeze(-1)).sum(dim=-1, dtype=torch.int32)
    if options.top_k:
        values, indices = lp.topk(options.top_k, dim=-1)
        out["top_k_logprobs"], out["top_k_ids"] = values, indices.to(torch.int32)
    if options.entropy or options.expected_logprob:
        # -inf log-probs (masked vocabulary) have p = 0; clamping keeps 0 * inf out.
        # (Sums are torch reductions, not a batched matmul: over a 30k vocabulary a
        # matmul's float32 accumulation is 50x less precise, 1e-4 on an entropy of 10.)
        lp.clamp_(min=-1e4)
        p = lp.exp()
        mean = torch.linalg.vecdot(p, lp)  # E[log p] = sum p log p
        out["entropy"] = -mean
        out["expected_logprob"] = mean
        if not options.expected_logprob:
            return out
        # Centred (sum p (log p - E)^2), in place: E[(log p)^2] - E^2 cancels
        # catastrophically in float32 when the distribution is nearly flat.
        out["logprob_variance"] = torch.linalg.vecdot(p, lp.sub_(mean.unsqueeze(-1)).square_())
    return out


def unpack(host: np.ndarray, cols: dict[str, slice], items: Sequence[LogProbsItem]) -> list[Any]:
    """The packed [N, C] host array → one SequenceStats per item (views, no copies)."""
    as_int = host.view(np.int32)
    results: list[Any] = []
    offset = 0
    for item in items:
        n, opts = len(item.ids), item.options
        span = slice(offset, offset + n - 1)
        offset += n - 1

        def take(key: str, on: bool, span: slice = span) -> Any:
            if not on:
                return None
            arr = as_int if key in INT_KEYS else host
            c = cols[key]
            if key.startswith("top_k"):  # (n-1, k) even when the widest k is 1
                return arr[span, c]
            return arr[span, c.start] if c.stop - c.start == 1 else arr[span, c]

        k = opts.top_k
        results.append(
            SequenceStats(
                token_ids=np.asarray(item.ids, dtype="<i4"),
                logprobs=take("logprobs", True),
                entropy=take("entropy", opts.entropy),
                expected_logprob=take("expected_logprob", opts.expected_logprob),
                logprob_variance=take("logprob_variance", opts.expected_logprob),
                rank=take("rank", opts.rank),
                top_k_ids=take("top_k_ids", bool(k))[:, :k] if k else None,
                top_k_logprobs=take("top_k_logprobs", bool(k))[:, :k] if k else None,
            )
        )
    return results
