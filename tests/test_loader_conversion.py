"""Conversion, refusal and wire-value checks of the loader (issue 11), each on a tiny
checkpoint that save_pretrained wrote: the failure modes the coverage matrix does not
reach (numbering gaps, a wrong slice caught by the reverse fingerprint, hints that must not
suggest tying, quantization without a config, impossible max_length)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import tiny_models
import torch
import zoo_models
from loader_helpers import load_one, metric, rewrite_checkpoint, spec
from zoo_archs import ARCHS

from modelcache.config import parse_config
from modelcache.daemon import materialize
from modelcache.daemon.registry import ModelRegistry, ModelState


def _arch(arch_id: str) -> zoo_models.Arch:
    return next(a for a in ARCHS if a.id == arch_id)


def _build(tmp_path: Path, arch_id: str) -> Path:
    return zoo_models.build(_arch(arch_id), tmp_path / arch_id)


def test_expert_numbering_with_a_gap_is_refused(tmp_path: Path) -> None:
    """Experts 0,1,2,4 of 4: stacked in sorted order they would fill slots 0..3 and shift
    expert 4 into slot 3; the load fails instead."""
    path = _build(tmp_path, "mixtral-lm")

    def gap(t: dict[str, torch.Tensor]) -> None:
        for k in [k for k in t if ".experts.3." in k]:
            t[k.replace(".experts.3.", ".experts.4.")] = t.pop(k)

    rewrite_checkpoint(path, gap)
    entry = load_one(path, "causal-lm")
    assert entry.error_class == "corrupt_weights" and "not numbered 0..3" in entry.error


def test_a_slice_written_to_the_wrong_expert_fails_the_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fingerprint walks the conversion backwards: every expert slice of a fused tensor
    is compared with the per-expert tensor in the file it came from."""
    path = _build(tmp_path, "mixtral-lm")
    real = materialize.fill

    def swapped(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        out = real(*args, **kwargs)
        fused = out["model.layers.1.mlp.experts.down_proj"]
        out["model.layers.1.mlp.experts.down_proj"] = fused[[1, 0, 2, 3]].contiguous()
        return out

    monkeypatch.setattr(materialize, "fill", swapped)
    entry = load_one(path, "causal-lm")
    assert entry.error_class == "verify_failed"
    assert "model.layers.1.block_sparse_moe.experts.0.w2.weight" in entry.error


def test_the_tie_hint_is_not_given_when_a_checkpoint_tensor_has_the_heads_shape(
    tmp_path: Path,
) -> None:
    """Pythia-like: the head is stored under a name the model does not know. Allowing it as
    unexpected must not lead to "tie it" (that served the input embedding as lm_head)."""
    path = _build(tmp_path, "gpt_neox-lm")
    rewrite_checkpoint(path, lambda t: t.update({"output_head.weight": t.pop("embed_out.weight")}))
    entry = load_one(path, "causal-lm", allow_unexpected=[r"^output_head\."])
    assert entry.error_class == "missing_weights" and "lm_head.weight" in entry.error
    assert "output_head.weight" in entry.error and "do not tie" in entry.error
    assert "Set tie_word_embeddings" not in entry.error


def test_the_tie_hint_still_helps_a_checkpoint_saved_tied(tmp_path: Path) -> None:
    path = tiny_models.gpt2(tmp_path / "gpt2", tied=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(cfg))
    entry = load_one(path, "causal-lm")
    assert entry.error_class == "missing_weights" and "Set tie_word_embeddings" in entry.error


def test_fp8_tensors_are_refused_without_any_quantization_config(tmp_path: Path) -> None:
    path = tiny_models.llama(tmp_path / "llama")
    key = "model.layers.0.mlp.up_proj.weight"
    rewrite_checkpoint(path, lambda t: t.update({key: t[key].to(torch.float8_e4m3fn)}))
    before = metric("modelcache_model_loads_total", model="m", outcome="unsupported_quantization")
    entry = load_one(path, "causal-lm", allow_unexpected=[".*"], allow_missing=[".*"])
    assert entry.state is ModelState.FAILED
    assert entry.error_class == "unsupported_quantization" and key in entry.error
    after = metric("modelcache_model_loads_total", model="m", outcome="unsupported_quantization")
    assert after == before + 1


def test_a_quantization_config_alone_is_refused(tmp_path: Path) -> None:
    """Weights that look like floats but are declared quantized (bnb, torchao...) are not
    what the model would compute with: refused before anything is read."""
    path = tiny_models.bert(tmp_path / "bert")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (path / "config.json").write_text(json.dumps(cfg))
    entry = load_one(path, "embedding")
    assert entry.error_class == "unsupported_quantization"
    assert "bitsandbytes" in entry.error


def test_integer_buffers_of_old_checkpoints_still_load(tmp_path: Path) -> None:
    """Old BERT files carry embeddings.position_ids (int64), a non-persistent buffer: an
    integer tensor with an integer home is not a quantized weight."""
    path = tiny_models.bert(tmp_path / "bert")
    ids = torch.arange(256, dtype=torch.int64)[None]
    rewrite_checkpoint(path, lambda t: t.update({"embeddings.position_ids": ids}))
    assert load_one(path, "embedding").state is ModelState.READY


def test_nomic_bert_with_its_hub_auto_map_loads_natively(tmp_path: Path) -> None:
    path = _build(tmp_path, "nomic_bert-embed")
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {
        "AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig",
        "AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel",
    }
    (path / "config.json").write_text(json.dumps(cfg))
    entry = load_one(path, "embedding")
    assert entry.state is ModelState.READY, entry.error
    assert entry.loaded is not None
    assert type(entry.loaded.model).__name__ == "NomicBertModel"


def test_an_impossible_max_length_fails_that_model_only(tmp_path: Path) -> None:
    """MPNet-style: pad_token_id beyond the positions gives a negative max_length, which
    used to break ListModels for every model."""
    bad = _build(tmp_path, "mpnet-embed")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["pad_token_id"] = 200  # positions 130 - (200 + 1) = -71
    (bad / "config.json").write_text(json.dumps(cfg))
    good = tiny_models.bert(tmp_path / "good")
    r = ModelRegistry(
        parse_config({"models": [spec("bad", bad, "embedding"), spec("good", good, "embedding")]})
    )
    r.prepare()
    entries = {e.spec.name: e for e in r.load_all()}
    r.close()
    assert entries["good"].state is ModelState.READY
    assert entries["bad"].state is ModelState.FAILED
    assert entries["bad"].error_class == "bad_config"
    assert "max_length would be -71" in entries["bad"].error
    assert "pad_token_id=200" in entries["bad"].error
