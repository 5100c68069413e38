"""The loader against real tiny checkpoints: correct weights, or a loud, counted failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_models
import torch
from loader_helpers import cosine, load_one, metric, outputs, rewrite_checkpoint

from modelcache.daemon.registry import ModelState

BUILDERS = {
    "gpt2": (tiny_models.gpt2, "causal-lm"),
    "llama": (tiny_models.llama, "causal-lm"),
    "bert": (tiny_models.bert, "embedding"),
    "roberta": (tiny_models.roberta, "embedding"),
}


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_loads_the_same_weights_as_from_pretrained(tmp_path: Path, arch: str) -> None:
    build, task = BUILDERS[arch]
    path = build(tmp_path / arch)
    entry = load_one(path, task)
    assert entry.state is ModelState.READY, entry.error
    lm = entry.loaded
    assert lm is not None
    ref = tiny_models.reference(path, task)
    inputs = tiny_models.encode(path)
    got, want = outputs(lm.model, inputs, task), outputs(ref, inputs, task)
    assert cosine(got, want) >= 0.9999
    assert torch.allclose(got, want, atol=1e-5)
    ref_state = ref.state_dict()
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    assert len(lm.fingerprint) == 64 and lm.weight_bytes > 0
    assert set(lm.stage_seconds) >= {"resolve", "read", "materialize", "verify", "warmup", "total"}


def test_bundled_minilm_equals_sentence_transformers() -> None:
    from sentence_transformers import SentenceTransformer

    from modelcache.examples import bundled_minilm

    entry = load_one(bundled_minilm(), "embedding")
    lm = entry.loaded
    assert lm is not None, entry.error
    texts = ["a training pod asks for an embedding", "meta tensors have no data"]
    enc = lm.tokenizer(texts, padding=True, return_tensors="pt")
    hidden = outputs(lm.model, dict(enc), "embedding")
    mask = enc["attention_mask"].unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    ref = SentenceTransformer(str(bundled_minilm()), device="cpu").encode(
        texts, convert_to_tensor=True
    )
    assert torch.nn.functional.cosine_similarity(ours, ref).min() >= 0.9999
    # Non-persistent buffers were computed on the device, not left on meta.
    buffers = dict(lm.model.named_buffers())
    assert torch.equal(buffers["embeddings.position_ids"].flatten()[:5], torch.arange(5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loads_straight_into_the_requested_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    path = tiny_models.llama(tmp_path / "llama")
    entry = load_one(path, "causal-lm", dtype=str(dtype).removeprefix("torch."))
    lm = entry.loaded
    assert lm is not None, entry.error
    assert {p.dtype for p in lm.model.parameters()} == {dtype}
    ref = tiny_models.reference(path, "causal-lm", dtype=dtype)
    inputs = tiny_models.encode(path)
    assert cosine(outputs(lm.model, inputs, "causal-lm"), outputs(ref, inputs, "causal-lm")) > 0.999


def test_missing_key_fails_and_names_it(tmp_path: Path) -> None:
    path = tiny_models.bert(tmp_path / "bert")
    rewrite_checkpoint(path, lambda t: t.pop("encoder.layer.1.output.dense.weight"))
    before = metric("modelcache_model_loads_total", model="m", outcome="missing_weights")
    entry = load_one(path, "embedding")
    assert entry.state is ModelState.FAILED
    assert entry.error_class == "missing_weights"
    assert "encoder.layer.1.output.dense.weight" in entry.error
    after = metric("modelcache_model_loads_total", model="m", outcome="missing_weights")
    assert after == before + 1
    assert metric("modelcache_model_loaded", model="m") == 0


def test_allow_missing_initialises_only_the_allowed_keys(tmp_path: Path) -> None:
    path = tiny_models.bert(tmp_path / "bert")
    rewrite_checkpoint(path, lambda t: t.pop("pooler.dense.weight"))
    entry = load_one(path, "embedding", allow_missing=[r"^pooler\.dense\.weight$"])
    lm = entry.loaded
    assert lm is not None, entry.error
    ref = tiny_models.reference(path, "embedding").state_dict()
    state = lm.model.state_dict()
    for k, v in state.items():
        if k != "pooler.dense.weight":
            assert torch.equal(v, ref[k]), f"{k} was re-initialised"
    assert torch.isfinite(state["pooler.dense.weight"]).all()
    assert state["pooler.dense.weight"].std() > 0  # initialised by the model, not left zero


def test_unexpected_key_fails_unless_allowed(tmp_path: Path) -> None:
    path = tiny_models.bert(tmp_path / "bert")
    rewrite_checkpoint(path, lambda t: t.update({"classifier.weight": torch.zeros(2, 64)}))
    entry = load_one(path, "embedding")
    assert entry.error_class == "unexpected_weights" and "classifier.weight" in entry.error
    assert load_one(path, "embedding", allow_unexpected=["^classifier"]).state is ModelState.READY


def test_tied_checkpoint_with_untied_config_fails(tmp_path: Path) -> None:
    """Measured: transformers leaves lm_head random here, silently."""
    path = tiny_models.gpt2(tmp_path / "gpt2", tied=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(cfg))
    entry = load_one(path, "causal-lm")
    assert entry.error_class == "missing_weights"
    assert "lm_head.weight" in entry.error and "tie_word_embeddings" in entry.error


def test_untied_checkpoint_with_tied_config_fails_verification(tmp_path: Path) -> None:
    path = tiny_models.gpt2(tmp_path / "gpt2", tied=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(cfg))
    entry = load_one(path, "causal-lm")
    assert entry.state is ModelState.FAILED
    assert entry.error_class == "verify_failed"


def test_untied_checkpoint_keeps_its_own_head(tmp_path: Path) -> None:
    path = tiny_models.gpt2(tmp_path / "gpt2", tied=False)
    lm = load_one(path, "causal-lm").loaded
    assert lm is not None
    emb = lm.model.get_input_embeddings().weight
    head = lm.model.get_output_embeddings().weight
    assert emb.data_ptr() != head.data_ptr() and not torch.equal(emb, head)


def test_tied_checkpoint_shares_one_tensor(tmp_path: Path) -> None:
    lm = load_one(tiny_models.gpt2(tmp_path / "gpt2", tied=True), "causal-lm").loaded
    assert lm is not None
    assert (
        lm.model.get_input_embeddings().weight.data_ptr()
        == lm.model.get_output_embeddings().weight.data_ptr()
    )


def test_wrong_task_for_architecture(tmp_path: Path) -> None:
    entry = load_one(tiny_models.bert(tmp_path / "bert"), "causal-lm")
    assert entry.state is ModelState.FAILED
    assert entry.error_class in {"bad_config", "unexpected_weights", "missing_weights"}


def test_fingerprint_is_stable_and_content_addressed(tmp_path: Path) -> None:
    a = tiny_models.gpt2(tmp_path / "a", seed=5)
    b = tiny_models.gpt2(tmp_path / "b", seed=5)
    c = tiny_models.gpt2(tmp_path / "c", seed=6)
    fps = [load_one(p, "causal-lm").loaded.fingerprint for p in (a, b, c)]  # type: ignore[union-attr]
    assert fps[0] == fps[1] != fps[2]
