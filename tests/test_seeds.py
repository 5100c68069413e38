"""The four incidents in ../shared/seeds, reproduced, and the loader's answer to each."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_models
import torch
import transformers
from loader_helpers import load_one, metric, outputs

from modelcache.daemon import verify
from modelcache.daemon.errors import ModelLoadError
from modelcache.daemon.registry import ModelState


class CriteriaModel(torch.nn.Module):
    """Seed 001: a Python-built head registered first, a pretrained encoder second."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.classifier = torch.nn.Linear(64, 2)
        self.encoder = encoder


def test_seed001_first_parameter_check_misses_meta_encoder_but_ours_does_not(
    tmp_path: Path,
) -> None:
    path = tiny_models.roberta(tmp_path / "roberta")
    with torch.device("meta"):
        encoder = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(path))
    model = CriteriaModel(encoder)
    assert next(model.parameters()).device.type == "cpu"  # the buggy check passes
    with pytest.raises(NotImplementedError, match="meta tensor"):
        model.to("cpu", torch.float16)  # and the incident's crash follows
    before = metric("modelcache_meta_tensor_errors_total", model="seed001", kind="parameter")
    with pytest.raises(ModelLoadError, match=r"encoder\.embeddings\.word_embeddings\.weight"):
        verify.check_placement(model, "seed001", torch.device("cpu"), torch.float32)
    assert metric("modelcache_meta_tensor_errors_total", model="seed001", kind="parameter") > before
    # The same encoder through modelcache: real weights, equal to the checkpoint.
    lm = load_one(path, "embedding").loaded
    assert lm is not None
    ref = tiny_models.reference(path, "embedding")
    inputs = tiny_models.encode(path)
    assert torch.equal(outputs(lm.model, inputs, "embedding"), outputs(ref, inputs, "embedding"))


def test_seed001_to_empty_reset_parameters_fix_gives_random_weights(tmp_path: Path) -> None:
    """The 'fix' makes the error go away and the model silently wrong."""
    path = tiny_models.gpt2(tmp_path / "gpt2")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(path)
        )
    model.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    ref = tiny_models.reference(path, "causal-lm")
    inputs = tiny_models.encode(path)
    out, want = outputs(model, inputs, "causal-lm"), outputs(ref, inputs, "causal-lm")
    # No exception anywhere, and the outputs are not the pretrained model's (random or
    # uninitialised memory where Conv1D has no reset_parameters).
    assert not torch.allclose(torch.nan_to_num(out), want, atol=1e-2)
    # modelcache never does this; its fingerprint check compares live weights to the file.
    lm = load_one(path, "causal-lm").loaded
    assert lm is not None
    assert torch.equal(outputs(lm.model, inputs, "causal-lm"), want)


def test_meta_buffers_are_caught_by_name(tmp_path: Path) -> None:
    """Non-persistent buffers are not in checkpoints; left on meta the outputs are wrong."""
    from modelcache.examples import bundled_minilm

    lm = load_one(bundled_minilm(), "embedding").loaded
    assert lm is not None
    model = lm.model
    original = model.embeddings.position_ids
    model.embeddings.register_buffer(
        "position_ids", torch.empty_like(original, device="meta"), persistent=False
    )
    try:
        with pytest.raises(ModelLoadError, match=r"buffers \[embeddings\.position_ids\]"):
            verify.check_placement(model, "minilm-meta", torch.device("cpu"), torch.float32)
        assert (
            metric("modelcache_meta_tensor_errors_total", model="minilm-meta", kind="buffer") >= 1
        )
    finally:
        model.embeddings.register_buffer("position_ids", original, persistent=False)


def test_device_map_meta_is_caught(tmp_path: Path) -> None:
    path = tiny_models.gpt2(tmp_path / "gpt2")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), device_map="meta")
    with pytest.raises(ModelLoadError) as info:
        verify.check_placement(model, "devmap", torch.device("cpu"), torch.float32)
    assert info.value.error_class == "meta_tensor"
    assert "transformer.wte.weight" in str(info.value)


def test_seed002_versions_are_exported_for_skew_detection() -> None:
    from modelcache.daemon.loader import record_build_info, versions

    record_build_info()
    v = versions()
    assert v["torch"].startswith("2.13.0") and v["transformers"] == "5.23.0"
    assert (
        metric(
            "modelcache_build_info",
            version=v["modelcache"],
            torch=v["torch"],
            transformers=v["transformers"],
            python=v["python"],
            cuda=v["cuda"],
        )
        == 1
    )


def test_seed000_many_detectors_share_one_loaded_model(tmp_path: Path) -> None:
    """64 evaluations asking for the same detector model: one load, no retries amplified."""
    import asyncio

    from loader_helpers import spec

    from modelcache.config import parse_config
    from modelcache.daemon.registry import ModelRegistry

    path = tiny_models.gpt2(tmp_path / "gpt2")
    r = ModelRegistry(parse_config({"models": [spec("detector", path, "causal-lm")]}))
    r.prepare()

    async def evaluations() -> list[object]:
        return await asyncio.gather(*(r.aget("detector") for _ in range(64)))

    models = asyncio.run(evaluations())
    assert r.load_count["detector"] == 1 and len({id(m) for m in models}) == 1
    assert r.entry("detector").state is ModelState.READY
    r.close()
