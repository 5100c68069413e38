"""Pure torch compute for serving: tokenization, pooled embeddings, per-token log-probs.

Nothing here knows about gRPC or queues. The batch worker calls ``ModelCompute.run`` with
sequences that are already token ids (tokenization happens at admission, on another
thread, while the worker runs the previous batch), sorted by length so padding is small.

Why the log-prob statistics look the way they do: a [B, T, V] logits tensor is 200 KB per
token for a 50k vocabulary, so it never leaves the device. log_softmax runs in float32 on
the device, the observed token is gathered there, and entropy, E[log p], Var[log p], rank
and top-k are reductions over V; only [B, T] (or [B, T, k]) results are copied to the host.
Rows are processed in chunks whose logits fit ``LOGIT_CHUNK_ELEMENTS`` so that one large
batch cannot allocate gigabytes of float32 logits at once.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from modelcache.daemon.loader import LoadedModel

MAX_TOP_K = 20
#: Upper bound on float32 logits materialised per forward chunk (128 MiB); the statistics
#: need up to three more tensors of that size. (Their sums are torch reductions, not a
#: batched matmul: over a 30k vocabulary a matmul's float32 accumulation is 50x less
#: precise, 1e-4 on an entropy of 10.)
LOGIT_CHUNK_ELEMENTS = 1 << 25
#: The fixed cost of one forward pass, in padded tokens' worth of compute: small on a CPU
#: (a pass is mostly its tokens), large on a GPU (launch overhead; padding is nearly free).
FORWARD_OVERHEAD_TOKENS = {"cpu": 32, "cuda": 1 << 20}
#: Models whose position ids start after the padding index (fairseq heritage).
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "mpnet"}

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]


class InputError(ValueError):
    """A request the model cannot serve as given; the message names the offending input."""


@dataclass(frozen=True)
class EmbedItem:
    ids: list[int]
    normalize: bool


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


def _max_length(loaded: LoadedModel) -> int:
    """The spec's max_length, capped by what the model's positions and tokenizer allow, so
    an over-long input is rejected or truncated instead of crashing the forward pass."""
    limit = loaded.spec.max_length
    cfg = loaded.model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for attr in ("max_position_embeddings", "n_positions"):
        positions = getattr(cfg, attr, None)
        if isinstance(positions, int) and positions > 0:
            if getattr(cfg, "model_type", "") in _OFFSET_POSITIONS:
                positions -= int(getattr(cfg, "pad_token_id", 0) or 0) + 1
            limit = min(limit, positions)
            break
    tok_limit = getattr(loaded.tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:
        limit = min(limit, tok_limit)
    return limit


def split_by_length(lengths: Sequence[int], overhead: int) -> list[int]:
    """Boundaries (0 = b0 < b1 < ... = n) that cut a length-sorted batch into forward
    passes minimising sum(rows x longest) + overhead per pass (dynamic programming).

    A batch that mixes 8- and 80-token sentences wastes most of its compute on padding
    when run as one [rows, 80] pass; on a CPU, where compute is proportional to padded
    tokens and a pass costs little more than its tokens, a few passes of similar lengths
    are much cheaper. On a GPU the per-pass overhead dominates and this keeps one pass.
    """
    n = len(lengths)
    best = [0] + [1 << 62] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds = [n]
    while bounds[-1] > 0:
        bounds.append(cut[bounds[-1]])
    return bounds[::-1]


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask. Right padding keeps positions 0..n-1 for
    every real token; causal models never attend to the padding on their right."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = s
        mask[row, : len(s)] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, T, D] hidden states → [B, D], ignoring padding (mean as sentence-transformers)."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)


def token_statistics(
    logits: torch.Tensor, ids: torch.Tensor, options: LogProbsOptions
) -> dict[str, torch.Tensor]:
    """Statistics of next-token prediction, all [B, T-1] (top-k: [B, T-1, k]), on device.

    ``logits`` is [B, T, V]; position t predicts ``ids[:, t + 1]``.
    """
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = ids[:, 1:].unsqueeze(-1)
    observed = lp.gather(-1, target).squeeze(-1)
    out = {"logprobs": observed}
    if options.rank:
        out["rank"] = (lp > observed.unsqueeze(-1)).sum(dim=-1, dtype=torch.int32)
    if options.top_k:
        values, indices = lp.topk(options.top_k, dim=-1)
        out["top_k_logprobs"], out["top_k_ids"] = values, indices.to(torch.int32)
    if options.entropy or options.expected_logprob:
        # -inf log-probs (masked vocabulary) have p = 0; clamping keeps 0 * inf out.
        lp.clamp_(min=-1e4)
        p = lp.exp()
        mean = torch.linalg.vecdot(p, lp)  # E[log p] = sum p log p
        if options.entropy:
            out["entropy"] = -mean
        if options.expected_logprob:
            out["expected_logprob"] = mean
            # Centred (sum p (log p - E)^2), in place: E[(log p)^2] - E^2 cancels
            # catastrophically in float32 when the distribution is nearly flat.
            out["logprob_variance"] = torch.linalg.vecdot(p, lp.sub_(mean.unsqueeze(-1)).square_())
    return out


def _merge(items: Sequence[LogProbsItem]) -> LogProbsOptions:
    return LogProbsOptions(
        top_k=max(i.options.top_k for i in items),
        entropy=any(i.options.entropy for i in items),
        expected_logprob=any(i.options.expected_logprob for i in items),
        rank=any(i.options.rank for i in items),
    )


class ModelCompute:
    """Tokenization and batched forward passes for one loaded model."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model: Any = loaded.model
        self.tokenizer: Any = loaded.tokenizer
        self.device = loaded.device
        self.task = loaded.spec.task
        self.max_length = _max_length(loaded)
        self._tokenizer_lock = threading.Lock()
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        self.vocab_size = int(self.model.get_input_embeddings().num_embeddings)

    # -- admission-side helpers (any thread) -------------------------------------------
    def tokenize(self, texts: Sequence[str], truncate: bool) -> list[list[int]]:
        """Token ids with the model's special tokens; over-long inputs are cut to
        max_length, or rejected naming their index when ``truncate`` is false."""
        # A fast tokenizer keeps truncation as state on its shared Rust object and sets it
        # on every call: two threads tokenizing with different `truncate` flags can each
        # run with the other's setting (seen in the wire fuzz: 39 tokens returned past a
        # max_length of 24). One lock per model makes each call see its own setting.
        with self._tokenizer_lock:
            enc = self.tokenizer(
                list(texts),
                add_special_tokens=True,
                truncation=truncate,
                max_length=self.max_length if truncate else None,
                return_attention_mask=False,
                return_token_type_ids=False,
                verbose=False,
            )
        ids: list[list[int]] = enc["input_ids"]
        for i, seq in enumerate(ids):
            # A tokenizer without special tokens turns whitespace, control or combining
            # characters alone into nothing; a zero-length row cannot be run or pooled.
            if not seq:
                raise InputError(
                    f"inputs[{i}] has no tokens: the model's tokenizer produced none for it"
                )
            if not truncate and len(seq) > self.max_length:
                raise InputError(
                    f"inputs[{i}] has {len(seq)} tokens, more than the model's "
                    f"max_length {self.max_length} (set truncate to cut it)"
                )
        return ids

    def check_token_ids(self, seqs: Sequence[Sequence[int]], truncate: bool) -> list[list[int]]:
        """Pre-tokenized sequences, validated against the vocabulary and max_length."""
        out: list[list[int]] = []
        for i, seq in enumerate(seqs):
            arr = np.asarray(seq, dtype=np.int64)
            if arr.size == 0:
                raise InputError(f"token_ids[{i}] is empty")
            bad = np.flatnonzero((arr < 0) | (arr >= self.vocab_size))
            if bad.size:
                j = int(bad[0])
                raise InputError(
                    f"token_ids[{i}][{j}] = {int(arr[j])} is outside the "
                    f"vocabulary [0, {self.vocab_size})"
                )
            if arr.size > self.max_length:
                if not truncate:
                    raise InputError(
                        f"token_ids[{i}] has {arr.size} tokens, more than the "
                        f"model's max_length {self.max_length} (set truncate to "
                        "cut it)"
                    )
                arr = arr[: self.max_length]
            out.append(arr.tolist())
        return out

    # -- worker side -------------------------------------------------------------------
    def run(self, items: Sequence[Any]) -> list[Any]:
        """One batch (already sorted by length): rows of float32 embeddings, or one
        SequenceStats per sequence. Called only on the model's worker thread."""
        with torch.inference_mode():
            if self.task == "embedding":
                return list(self.embed(items))
            return self.logprobs(items)

    def embed(self, items: Sequence[EmbedItem]) -> F32:
        overhead = FORWARD_OVERHEAD_TOKENS.get(self.device.type, 0)
        bounds = split_by_length([len(i.ids) for i in items], overhead)
        parts = [self._embed_part(items[a:b]) for a, b in itertools.pairwise(bounds)]
        result: F32 = np.concatenate(parts).astype("<f4", copy=False)
        return result

    def _embed_part(self, items: Sequence[EmbedItem]) -> F32:
        ids, mask = pad_batch([i.ids for i in items], self.pad_id, self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = pool(hidden.float(), mask, self.loaded.spec.pooling)
        flags = torch.tensor([i.normalize for i in items], device=pooled.device)
        if bool(flags.any()):
            normed = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            pooled = torch.where(flags.unsqueeze(1), normed, pooled)
        result: F32 = pooled.cpu().numpy()
        return result

    def logprobs(self, items: Sequence[LogProbsItem]) -> list[SequenceStats]:
        results: list[SequenceStats] = []
        vocab = int(self.loaded.output_dims) or self.vocab_size
        start = 0
        while start < len(items):
            # Items are sorted by length, so the chunk's width is its last item's length.
            stop = start + 1
            while (
                stop < len(items)
                and (stop + 1 - start) * len(items[stop].ids) * vocab <= LOGIT_CHUNK_ELEMENTS
            ):
                stop += 1
            results += self._logprobs_chunk(items[start:stop])
            start = stop
        return results

    def _logprobs_chunk(self, items: Sequence[LogProbsItem]) -> list[SequenceStats]:
        ids, mask = pad_batch([i.ids for i in items], self.pad_id, self.device)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        stats = token_statistics(logits, ids, _merge(items))
        del logits
        host = {k: v.cpu().numpy() for k, v in stats.items()}
        ids_host = ids.cpu().numpy().astype("<i4")
        results = []
        for row, item in enumerate(items):
            n, opts = len(item.ids), item.options
            span = slice(0, n - 1)

            def take(key: str, on: bool, row: int = row, span: slice = span) -> Any:
                return host[key][row, span] if on else None

            k = opts.top_k
            results.append(
                SequenceStats(
                    token_ids=ids_host[row, :n],
                    logprobs=host["logprobs"][row, span],
                    entropy=take("entropy", opts.entropy),
                    expected_logprob=take("expected_logprob", opts.expected_logprob),
                    logprob_variance=take("logprob_variance", opts.expected_logprob),
                    rank=take("rank", opts.rank),
                    top_k_ids=host["top_k_ids"][row, span, :k] if k else None,
                    top_k_logprobs=host["top_k_logprobs"][row, span, :k] if k else None,
                )
            )
        return results
