"""The log-prob engine (body once, head over slices) against transformers' own forward.

Every statistic of every position is compared with a float64 computation from the
model's full forward logits (|delta| <= 1e-4 in float32), for plain heads and for the
architectures that post-process logits (gemma2 softcapping, cohere logit_scale, granite
logits_scaling), which the split path must reproduce; a forward it cannot reproduce
falls back to the full forward, with the same results."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import transformers

from modelcache.daemon import logprobs
from modelcache.daemon.logprobs import LogProbEngine, split_head
from modelcache.daemon.logstats import LogProbsItem, LogProbsOptions, SequenceStats

ALL = LogProbsOptions(top_k=5, entropy=True, expected_logprob=True, rank=True)
CPU = torch.device("cpu")
VOCAB = 1000
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def build(kind: str, **extra: Any) -> Any:
    torch.manual_seed(7)
    cfg: Any
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=256, n_embd=64, n_layer=2, n_head=4
        )
    elif kind == "gemma2":  # a small cap, so that random weights' logits are really capped
        cfg = transformers.Gemma2Config(**COMMON, head_dim=16, final_logit_softcapping=0.1)
    elif kind == "cohere":
        cfg = transformers.CohereConfig(**COMMON, logit_scale=4.0)
    elif kind == "granite":
        cfg = transformers.GraniteConfig(**COMMON, logits_scaling=0.25)
    else:
        cfg = transformers.LlamaConfig(**COMMON, **extra)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def batch(lengths: list[int], opts: LogProbsOptions = ALL) -> list[LogProbsItem]:
    rng = np.random.default_rng(sum(lengths))
    return [LogProbsItem(rng.integers(3, VOCAB, n).tolist(), opts) for n in sorted(lengths)]


def reference(model: Any, ids: list[int]) -> dict[str, np.ndarray]:
    """Float64 statistics from the model's own full forward, unpadded."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    lp = torch.log_softmax(logits, -1)
    p = lp.exp()
    target = torch.tensor(ids[1:])
    obs = lp.gather(-1, target[:, None])[:, 0]
    mean = (p * lp).sum(-1)
    values = lp.topk(5, -1).values
    return {
        "logprobs": obs.numpy(),
        "entropy": (-mean).numpy(),
        "expected_logprob": mean.numpy(),
        "logprob_variance": (p * (lp - mean[:, None]) ** 2).sum(-1).numpy(),
        "lp": lp.numpy(),
        "top_k_logprobs": values.numpy(),
    }


def assert_matches(model: Any, items: list[LogProbsItem], got: list[SequenceStats]) -> None:
    for item, stats in zip(items, got, strict=True):
        want = reference(model, item.ids)
        assert stats.token_ids.tolist() == item.ids
        for key in ("logprobs", "entropy", "expected_logprob", "logprob_variance"):
            np.testing.assert_allclose(
                getattr(stats, key), want[key], atol=1e-4, rtol=0, err_msg=key
            )
        np.testing.assert_allclose(stats.top_k_logprobs, want["top_k_logprobs"], atol=1e-4, rtol=0)
        if len(item.ids) < 2:
            continue
        # Near-ties may order differently in float32: the ids must carry the values.
        lp, obs = want["lp"], want["logprobs"][:, None]
        picked = np.take_along_axis(lp, stats.top_k_ids.astype(np.int64), -1)
        np.testing.assert_allclose(picked, stats.top_k_logprobs, atol=1e-4, rtol=0)
        assert ((lp > obs + 1e-4).sum(-1) <= stats.rank).all()
        assert (stats.rank <= (lp > obs - 1e-4).sum(-1)).all()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma2", "cohere", "granite"])
def test_split_path_equals_the_full_forward(kind: str) -> None:
    model = build(kind)
    engine = LogProbEngine(model, CPU, pad_id=0, vocab=VOCAB)
    assert engine.split, engine.why_full
    items = batch([1, 9, 23, 40])  # padding, and a sequence with no position at all
    got = engine.run(items)
    assert got[0].logprobs.shape == (0,) and got[0].top_k_ids.shape == (0, 5)
    assert_matches(model, items, got)


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_the_post_processing_matters(kind: str) -> None:
    """Without the architecture's logit post-processing the results would be wrong: the
    head alone differs from the forward's logits (so the test above can fail)."""
    model = build(kind)
    body, _ = split_head(model)  # type: ignore[misc]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        raw = model.get_output_embeddings()(body(input_ids=ids)[0])
        assert (raw - model(input_ids=ids).logits).abs().max() > 1e-2


def test_slices_of_one_position_give_the_same_results() -> None:
    model = build("llama")
    engine = LogProbEngine(model, CPU, pad_id=0, vocab=VOCAB)
    items = batch([5, 17, 30])
    whole = engine.run(items)
    engine.slice_elements = 1
    for a, b in zip(whole, engine.run(items), strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
        np.testing.assert_allclose(a.logprob_variance, b.logprob_variance, atol=1e-5)
        np.testing.assert_array_equal(a.top_k_ids, b.top_k_ids)


def test_a_forward_the_split_cannot_reproduce_falls_back_to_it() -> None:
    """A head the configuration does not describe (here a hook on the forward's output)
    is caught by the probe: the engine runs the full forward, and matches it."""
    model = build("llama")

    def tempered(module: Any, args: Any, kwargs: Any, out: Any) -> Any:
        out.logits = out.logits * 3.0 + 1.0
        return out

    model.register_forward_hook(tempered, with_kwargs=True)
    engine = LogProbEngine(model, CPU, pad_id=0, vocab=VOCAB)
    assert not engine.split and "probe" in engine.why_full
    items = batch([4, 12, 33])
    assert_matches(model, items, engine.run(items))


def test_an_unknown_logit_setting_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("llama")
    model.config.logits_soft_cap = 30.0  # a post-processing this code does not know
    engine = LogProbEngine(model, CPU, pad_id=0, vocab=VOCAB)
    assert not engine.split and "logits_soft_cap" in engine.why_full
    monkeypatch.setattr(logprobs, "LOGIT_CHUNK_ELEMENTS", 1)  # one row per full forward
    items = batch([6, 6, 20])
    assert_matches(model, items, engine.run(items))


def test_per_item_options_share_one_packed_result() -> None:
    engine = LogProbEngine(build("gpt2"), CPU, pad_id=0, vocab=VOCAB)
    plain, ranked, topped = engine.run(
        [
            LogProbsItem([5, 6, 7], LogProbsOptions()),
            LogProbsItem([8, 9, 10, 11], LogProbsOptions(rank=True, entropy=True)),
            LogProbsItem([12, 13, 14, 15, 16], LogProbsOptions(top_k=3)),
        ]
    )
    assert plain.entropy is None and plain.rank is None and plain.top_k_ids is None
    assert (
        ranked.rank is not None and ranked.entropy is not None and ranked.logprob_variance is None
    )
    assert (
        ranked.rank.dtype == np.int32 and (ranked.rank >= 0).all() and (ranked.rank < VOCAB).all()
    )
    assert topped.top_k_ids is not None and topped.top_k_ids.shape == (4, 3) and topped.rank is None


def test_a_top_k_of_one_is_still_a_matrix() -> None:
    """The widest top_k of a batch is 1: one packed column, still (n-1, 1) per item (found by
    test_fuzz_wire: unpacking it as a vector failed the whole batch)."""
    engine = LogProbEngine(build("gpt2"), CPU, pad_id=0, vocab=VOCAB)
    (one,) = engine.run([LogProbsItem([5, 6, 7, 8], LogProbsOptions(top_k=1))])
    assert one.top_k_ids is not None and one.top_k_ids.shape == (3, 1)
    assert one.top_k_logprobs is not None and one.top_k_logprobs.shape == (3, 1)
    assert (one.top_k_logprobs[:, 0] >= one.logprobs - 1e-6).all()
