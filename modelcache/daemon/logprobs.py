"""Per-token log-prob statistics: the model body once per batch, the head over token slices.

Why this shape: the logits of one 4,000-token sequence over a 128,256-token vocabulary are
[4000, 128256] float32 = 2 GiB, and a full forward followed by log_softmax, exp and the
reductions materialised several tensors of that size (a daemon grew by 7.7 GiB on one such
request). Here the body — every layer up to and including the final norm — runs once over
the padded batch; only the real positions' last hidden states are kept ([N, D], small), and
the LM head, ``log_softmax(..., dtype=float32)`` and the reductions run over slices of at
most ``SLICE_ELEMENTS`` logits, so the peak is a few slices whatever the batch. Every
statistic is written into one packed [N, C] float32 tensor (integer columns bit-cast) that
comes to the host in one copy.

The split is only used where it is exact: architectures whose forward post-processes the
head's output (gemma2's ``final_logit_softcapping``, cohere's ``logit_scale``, granite's
``logits_scaling``) get the same operation here; a configuration naming any other logit
processing, or a model whose full forward disagrees with the split on a probe input (say a
custom head), runs the full forward instead — row chunks, statistics still over slices.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from modelcache.daemon.batchio import pad_batch, to_host
from modelcache.daemon.logstats import (
    INT_KEYS,
    LogProbsItem,
    LogProbsOptions,
    SequenceStats,
    layout,
    merge_options,
    token_statistics,
    unpack,
)

log = logging.getLogger(__name__)
#: Logits per head slice (64 MiB of float32 on a CPU; the statistics hold about three
#: tensors of that size at once). A GPU wants bigger matmuls and has the memory for them.
SLICE_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 26}
#: Rows x width x vocabulary per forward when the full forward has to be used.
LOGIT_CHUNK_ELEMENTS = 1 << 25
#: Configuration attributes about logits that do not touch the final logits.
_HARMLESS = re.compile(r"router|attn|attention|to_keep|auxiliary|init|contrastive|lsd")

Head = Callable[[torch.Tensor], torch.Tensor]


def _text_config(model: Any) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def split_head(model: Any) -> tuple[Any, Head] | str:
    """(body, head) computing the model's logits as its forward does, or why not."""
    body = getattr(model, "base_model", None)
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or lm_head is None:
        return "the model has no separate body and output embeddings"
    cfg = _text_config(model)
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(model, "logit_scale", None) or getattr(cfg, "logit_scale", None)
    divide = getattr(cfg, "logits_scaling", None)
    handled = {"final_logit_softcapping", "logit_scale", "logits_scaling"}
    unknown = sorted(
        k
        for k, v in cfg.to_dict().items()
        if ("logit" in k or "lm_head" in k)
        and k not in handled
        and not _HARMLESS.search(k)
        and v not in (None, False, 1, 1.0)
    )
    if unknown:
        return f"its configuration post-processes logits ({', '.join(unknown)})"
    if sum(x is not None and x != 1 for x in (cap, scale, divide)) > 1:
        return "more than one logit post-processing step"

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = lm_head(hidden)
        if cap is not None:
            logits = logits.div_(cap).tanh_().mul_(cap)
        elif scale is not None and scale != 1:
            logits = logits.mul_(scale)
        elif divide is not None and divide != 1:
            logits = logits.div_(divide)
        return logits

    return body, head


class LogProbEngine:
    """Log-prob statistics of one causal LM; ``run`` on the model's worker thread only."""

    def __init__(self, model: Any, device: torch.device, pad_id: int, vocab: int) -> None:
        self.model, self.device, self.pad_id, self.vocab = model, device, pad_id, vocab
        self.slice_elements = SLICE_ELEMENTS.get(device.type, SLICE_ELEMENTS["cpu"])
        self.body: Any = None
        self.head: Head | None = None
        self.why_full = ""
        self._decided = False

    def decide(self) -> None:
        """Split or full forward, once, on the worker thread before the first batch (not at
        construction: the model is READY then, and a probe would delay its first answer)."""
        if self._decided:
            return
        found = split_head(self.model)
        if isinstance(found, str):
            self.why_full = found
        else:
            self.body, self.head = found
            self.why_full = self._probe()
            if self.why_full:
                self.body = self.head = None
        if self.why_full:
            log.warning(
                "%s: log-probs use the full forward (memory grows with length x vocabulary): %s",
                type(self.model).__name__,
                self.why_full,
            )
        self._decided = True

    @property
    def split(self) -> bool:
        self.decide()
        return self.head is not None

    def _forward_kwargs(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        return {"input_ids": ids, "attention_mask": mask, "use_cache": False}

    def _probe(self) -> str:
        """Compare the split with the full forward on 8 tokens: '' when they agree."""
        assert self.body is not None and self.head is not None
        ids = (torch.arange(8, device=self.device) * 97 + 5) % max(self.vocab, 1)
        ids, mask = ids.unsqueeze(0), torch.ones(1, 8, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            full = self.model(**self._forward_kwargs(ids, mask)).logits[0].float()
            hidden = self.body(**self._forward_kwargs(ids, mask))[0]
            mine = self.head(hidden[0]).float()
        if full.shape != mine.shape:
            return f"the head's output {tuple(mine.shape)} is not the logits {tuple(full.shape)}"
        exact = full.dtype == torch.float32 and hidden.dtype == torch.float32
        tol = (1e-4 if exact else 2e-2) * (1.0 + float(full.abs().max()))
        delta = float((full - mine).abs().max())
        if not delta <= tol:
            return f"its forward's logits differ from its head's by {delta:.3g} on a probe"
        return ""

    def _positions(
        self, ids: torch.Tensor, mask: torch.Tensor, lengths: Sequence[int]
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, bool]]:
        """(offset, rows, targets, rows_are_hidden): the batch's predicting positions in
        order (row by row, position t predicting token t+1), as hidden states when the head
        is split off, else as logits of a full forward over row chunks."""
        if self.head is not None:
            hidden = self.body(**self._forward_kwargs(ids, mask))[0]
            keep = mask[:, 1:].bool()
            yield 0, hidden[:, :-1][keep], ids[:, 1:][keep], True
            return
        offset, start, vocab = 0, 0, max(self.vocab, 1)
        while start < len(lengths):
            stop, longest = start + 1, lengths[start]
            while stop < len(lengths) and (stop + 1 - start) * max(
                longest, lengths[stop]
            ) * vocab <= (LOGIT_CHUNK_ELEMENTS):
                longest = max(longest, lengths[stop])
                stop += 1
            width = max(lengths[start:stop])
            sub_ids, sub_mask = ids[start:stop, :width], mask[start:stop, :width]
            logits = self.model(**self._forward_kwargs(sub_ids, sub_mask)).logits
            for row in range(stop - start):
                n = lengths[start + row] - 1
                if n > 0:
                    yield offset, logits[row, :n], sub_ids[row, 1 : n + 1], False
                    offset += n
            del logits
            start = stop

    @torch.inference_mode()
    def run(self, items: Sequence[LogProbsItem]) -> list[SequenceStats]:
        """One length-sorted batch: the body once, then the head and statistics slice by
        slice into the packed result, fetched with one copy."""
        self.decide()
        opts = merge_options(items)
        cols, width = layout(opts)
        lengths = [len(i.ids) for i in items]
        total = sum(n - 1 for n in lengths)
        ids, mask = pad_batch([i.ids for i in items], self.pad_id, self.device)
        packed = torch.empty(total, width, dtype=torch.float32, device=self.device)
        as_int = packed.view(torch.int32)
        step = max(1, self.slice_elements // max(self.vocab, 1))
        for offset, rows, targets, hidden in self._positions(ids, mask, lengths):
            for a in range(0, rows.shape[0], step):
                b = min(a + step, rows.shape[0])
                logits = self.head(rows[a:b]) if hidden and self.head else rows[a:b]
                stats = token_statistics(logits, targets[a:b], opts)
                del logits
                for key, value in stats.items():
                    dest = as_int if key in INT_KEYS else packed
                    dest[offset + a : offset + b, cols[key]] = value.reshape(b - a, -1)
                del stats
        return unpack(to_host(packed), cols, items)


__all__ = [
    "LOGIT_CHUNK_ELEMENTS",
    "SLICE_ELEMENTS",
    "LogProbEngine",
    "LogProbsItem",
    "LogProbsOptions",
    "SequenceStats",
    "split_head",
    "token_statistics",
]
