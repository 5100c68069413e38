"""The compute functions against direct torch computations, on real (tiny and MiniLM)
models loaded through the registry: padding, pooling, statistics, chunking, limits."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest
import tiny_models
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from modelcache.config import parse_config
from modelcache.daemon.inference import (
    EmbedItem,
    InputError,
    LogProbsItem,
    LogProbsOptions,
    ModelCompute,
    pad_batch,
    pool,
    split_by_length,
    token_statistics,
)
from modelcache.daemon.registry import ModelRegistry

pytest.register_assert_rewrite("serving_fixtures")
from serving_fixtures import model  # noqa: E402

pytest_plugins = ("serving_fixtures",)

TEXTS = [
    "short one.",
    "a somewhat longer sentence with a few more words in it, clearly.",
    "mid length sentence here",
    "x",
]
ALL = LogProbsOptions(top_k=5, entropy=True, expected_logprob=True, rank=True)


def compute_of(registry: ModelRegistry, name: str) -> ModelCompute:
    loaded = registry.entry(name).loaded
    assert loaded is not None, registry.entry(name).error
    return ModelCompute(loaded)


def by_length(items: list[EmbedItem] | list[LogProbsItem]) -> list[int]:
    return sorted(range(len(items)), key=lambda i: len(items[i].ids))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(1, 9), min_size=1, max_size=6), st.sampled_from(["mean", "cls", "last"])
)
def test_pool_ignores_padding(lengths: list[int], mode: str) -> None:
    gen = torch.Generator().manual_seed(sum(lengths))
    hidden = torch.randn(len(lengths), max(lengths), 3, generator=gen, dtype=torch.float64)
    _, mask = pad_batch([[1] * n for n in lengths], 0, torch.device("cpu"))
    got = pool(hidden, mask, mode)
    for row, n in enumerate(lengths):
        real = hidden[row, :n]
        want = {"mean": real.mean(0), "cls": real[0], "last": real[-1]}[mode]
        torch.testing.assert_close(got[row], want)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=64), st.integers(0, 4096))
def test_split_by_length_never_costs_more_than_one_pass(lengths: list[int], overhead: int) -> None:
    lengths.sort()
    bounds = split_by_length(lengths, overhead)
    assert bounds[0] == 0 and bounds[-1] == len(lengths) and bounds == sorted(set(bounds))

    def cost(bs: list[int]) -> int:
        return sum((b - a) * lengths[b - 1] + overhead for a, b in itertools.pairwise(bs))

    assert cost(bounds) <= cost([0, len(lengths)])


def test_split_by_length_separates_short_from_long() -> None:
    assert split_by_length([8] * 16 + [80] * 16, overhead=32) == [0, 16, 32]
    assert split_by_length([8] * 16 + [80] * 16, overhead=1 << 20) == [0, 32]
    assert split_by_length([40] * 8, overhead=0) == [0, 8]


def test_pad_batch_is_right_padded() -> None:
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=3, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [8, 3, 3]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_statistics_match_a_float64_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 50, generator=gen) * 3
    logits[1, :, 7] = float("-inf")  # a masked vocabulary entry must not produce NaN
    ids = torch.randint(0, 50, (2, 6), generator=gen)
    ids[1, 3] = 7  # ...even when it is the observed token
    got = token_statistics(logits[:, :-1], ids[:, 1:], ALL)
    lp = torch.log_softmax(logits.double(), -1)[:, :-1]
    p = lp.exp()
    plogp = torch.where(p > 0, p * lp, 0.0)
    mean = plogp.sum(-1)
    second = torch.where(p > 0, p * lp * lp, 0.0).sum(-1)
    obs = lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got["logprobs"].double(), obs, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["entropy"].double(), -mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["expected_logprob"].double(), mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        got["logprob_variance"].double(), second - mean**2, atol=1e-4, rtol=1e-5
    )
    assert torch.equal(got["rank"].long(), (lp > obs[..., None]).sum(-1))
    values, indices = lp.topk(5, -1)
    torch.testing.assert_close(got["top_k_logprobs"].double(), values, atol=1e-5, rtol=0)
    assert torch.equal(got["top_k_ids"].long(), indices)
    assert all(torch.isfinite(v[~torch.isinf(v)]).all() for v in got.values())
    assert torch.isfinite(got["entropy"]).all() and torch.isfinite(got["logprob_variance"]).all()


def test_statistics_only_what_was_asked() -> None:
    logits, ids = torch.randn(1, 4, 10), torch.randint(0, 10, (1, 4))
    assert set(token_statistics(logits, ids, LogProbsOptions())) == {"logprobs"}
    entropy_only = token_statistics(logits, ids, LogProbsOptions(entropy=True))
    assert "logprob_variance" not in entropy_only and "entropy" in entropy_only


@pytest.mark.parametrize("name", ["minilm", "bert-cls"])
def test_padded_batch_equals_one_by_one(session_registry: ModelRegistry, name: str) -> None:
    compute = compute_of(session_registry, name)
    items = [EmbedItem(ids, True) for ids in compute.tokenize(TEXTS, truncate=True)]
    order = by_length(items)
    batched = compute.run([items[i] for i in order])
    for pos, i in enumerate(order):
        alone = compute.run([items[i]])[0]
        np.testing.assert_allclose(batched[pos], alone, atol=2e-5)
        assert np.linalg.norm(alone) == pytest.approx(1.0, abs=1e-5)


def test_last_token_pooling_on_a_decoder(tiny_lms: dict[str, Path]) -> None:
    registry = ModelRegistry(
        parse_config(
            {"models": [model("g", tiny_lms["gpt2"], "embedding", pooling="last", normalize=False)]}
        )
    )
    registry.prepare()
    registry.load_all()
    registry.close()
    compute = compute_of(registry, "g")
    ref = tiny_models.reference(tiny_lms["gpt2"], "embedding")
    items = [EmbedItem(ids, False) for ids in compute.tokenize(TEXTS, truncate=True)]
    order = by_length(items)
    got = compute.run([items[i] for i in order])
    with torch.inference_mode():
        for pos, i in enumerate(order):
            want = ref(input_ids=torch.tensor([items[i].ids])).last_hidden_state[0, -1]
            np.testing.assert_allclose(got[pos], want.numpy(), atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_logprobs_sliced_equals_unsliced(
    session_registry: ModelRegistry, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    compute = compute_of(session_registry, name)
    assert compute.logprob_engine is not None and compute.logprob_engine.split
    items = [LogProbsItem(ids, ALL) for ids in compute.tokenize(TEXTS, truncate=True)]
    items = [items[i] for i in by_length(items)]
    whole = compute.run(items)
    monkeypatch.setattr(compute.logprob_engine, "slice_elements", 1)  # one position a slice
    for a, b in zip(whole, compute.run(items), strict=True):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        np.testing.assert_allclose(a.logprob_variance, b.logprob_variance, atol=1e-4)
        assert a.top_k_ids is not None and a.top_k_ids.shape == (len(a.token_ids) - 1, 5)


def test_per_item_options_in_one_batch(session_registry: ModelRegistry) -> None:
    compute = compute_of(session_registry, "gpt2")
    ids = compute.tokenize(["first text here", "second text here"], truncate=True)
    plain, rich = compute.run(
        [
            LogProbsItem(ids[0], LogProbsOptions()),
            LogProbsItem(ids[1], LogProbsOptions(top_k=2, rank=True)),
        ]
    )
    assert plain.entropy is None and plain.rank is None and plain.top_k_ids is None
    assert rich.rank is not None and rich.top_k_ids is not None and rich.entropy is None
    assert rich.top_k_ids.shape == (len(ids[1]) - 1, 2)


def test_a_one_token_sequence_has_no_positions(session_registry: ModelRegistry) -> None:
    compute = compute_of(session_registry, "gpt2")
    one, three = compute.run([LogProbsItem([101], ALL), LogProbsItem([101, 7592, 102], ALL)])
    assert one.token_ids.tolist() == [101] and one.logprobs.shape == (0,)
    assert one.top_k_ids is not None and one.top_k_ids.shape == (0, 5)
    assert three.logprobs.shape == (2,) and np.isfinite(three.logprob_variance).all()


def test_max_length_is_capped_by_positions(tiny_lms: dict[str, Path]) -> None:
    registry = ModelRegistry(
        parse_config({"models": [model("g", tiny_lms["gpt2"], "causal-lm", max_length=4096)]})
    )
    registry.prepare()
    registry.load_all()
    registry.close()
    assert compute_of(registry, "g").max_length == 256  # n_positions of the tiny GPT-2


def test_tokenize_truncates_or_names_the_input(session_registry: ModelRegistry) -> None:
    compute = compute_of(session_registry, "minilm")
    long = "word " * 600
    ids = compute.tokenize(["ok", long], truncate=True)
    assert len(ids[1]) == compute.max_length == 256
    with pytest.raises(InputError, match=r"inputs\[1\] has \d+ tokens, more than .* 256"):
        compute.tokenize(["ok", long], truncate=False)


def test_token_ids_are_checked(session_registry: ModelRegistry) -> None:
    compute = compute_of(session_registry, "gpt2")
    v = compute.vocab_size
    assert compute.check_token_ids([[1, 2], [v - 1]], truncate=False) == [[1, 2], [v - 1]]
    with pytest.raises(InputError, match=rf"token_ids\[1\]\[2\] = {v} is outside"):
        compute.check_token_ids([[1], [1, 2, v]], truncate=False)
    with pytest.raises(InputError, match=r"token_ids\[0\]\[0\] = -1"):
        compute.check_token_ids([[-1]], truncate=False)
    with pytest.raises(InputError, match=r"token_ids\[0\] is empty"):
        compute.check_token_ids([[]], truncate=False)
    with pytest.raises(InputError, match=r"token_ids\[0\] has 300 tokens"):
        compute.check_token_ids([[5] * 300], truncate=False)
    assert len(compute.check_token_ids([[5] * 300], truncate=True)[0]) == 256


def _optimal_split_cost(lengths: list[int], overhead: int) -> int:
    """The exact O(n^2) optimum, as the old implementation computed it."""
    best = [0] + [1 << 62] * len(lengths)
    for j in range(1, len(lengths) + 1):
        for i in range(j):
            best[j] = min(best[j], best[i] + (j - i) * lengths[j - 1] + overhead)
    return best[-1]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 512), min_size=1, max_size=200), st.integers(0, 256))
def test_split_by_length_is_close_to_the_optimum(lengths: list[int], overhead: int) -> None:
    lengths.sort()
    bounds = split_by_length(lengths, overhead)
    cost = sum((b - a) * lengths[b - 1] + overhead for a, b in itertools.pairwise(bounds))
    assert cost <= 1.25 * _optimal_split_cost(lengths, overhead)


def test_split_by_length_is_linear_in_rows() -> None:
    lengths = sorted(np.random.default_rng(0).integers(1, 512, 4096).tolist())
    start = time.perf_counter()
    bounds = split_by_length(lengths, 32)
    assert time.perf_counter() - start < 0.02  # O(n^2): 1.2 s here; this: 0.3 ms
    assert len(bounds) > 2


def test_a_tokenizer_larger_than_the_embeddings_is_refused(tmp_path: Path) -> None:
    """Ids past the input embeddings would be a device-side assert on a GPU (the CUDA
    context is lost for every model of the process): text inputs are checked too."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=20000, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    dest = tmp_path / "small-vocab"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(dest)
    tiny_models.copy_tokenizer(dest)  # WordPiece ids up to 30521
    registry = ModelRegistry(parse_config({"models": [model("g", dest, "causal-lm")]}))
    registry.prepare()
    registry.load_all()
    registry.close()
    compute = compute_of(registry, "g")
    assert compute.tokenize(["the quick fox"], truncate=True)[0][-1] == 102
    with pytest.raises(InputError, match=r"inputs\[1\] tokenizes to id 29145 \('zebra'\).*20000"):
        compute.tokenize(["the fox", "hello zebra"], truncate=True)
    with pytest.raises(InputError, match=r"token_ids\[0\]\[1\] = 29145 is outside"):
        compute.check_token_ids([[101, 29145]], truncate=True)
