"""dtype defaults and the TF32 switch (issue 12): ``dtype: auto`` (the default) serves a
checkpoint in its own dtype on CUDA and in float32 on a CPU; ``tf32`` is process-wide."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_models
import torch
import transformers

from modelcache.config import ModelSpec, parse_config, resolve_dtype
from modelcache.daemon.inference import set_tf32
from modelcache.daemon.registry import ModelRegistry
from modelcache.daemon.resolve import prepare_model


def spec(**kw: str) -> ModelSpec:
    return ModelSpec(name="m", source="/m", task="causal-lm", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("device", "configured", "checkpoint", "served"),
    [
        ("cuda", "auto", torch.bfloat16, "bfloat16"),
        ("cuda:1", "auto", "float16", "float16"),
        ("cuda", "auto", None, "float32"),  # a checkpoint that names no dtype
        ("cuda", "auto", torch.float64, "float32"),  # not a dtype the daemon serves
        ("cpu", "auto", torch.bfloat16, "float32"),  # half precision is slow on CPUs
        ("cpu", "bfloat16", torch.float32, "bfloat16"),  # explicit wins
        ("cuda", "float32", torch.bfloat16, "float32"),
    ],
)
def test_resolve_dtype(device: str, configured: str, checkpoint: object, served: str) -> None:
    assert spec().dtype == "auto"
    assert resolve_dtype(spec(device=device, dtype=configured), checkpoint).dtype == served


def _bf16_gpt2(dest: Path) -> Path:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=tiny_models.VOCAB, n_positions=64, n_embd=32, n_layer=1, n_head=2
    )
    model = transformers.GPT2LMHeadModel(cfg).to(torch.bfloat16)
    dest.mkdir()
    model.save_pretrained(dest)
    tiny_models.copy_tokenizer(dest)
    return dest


def test_auto_reads_the_checkpoint_dtype_and_serves_float32_on_cpu(tmp_path: Path) -> None:
    source = _bf16_gpt2(tmp_path / "bf16")
    on_cuda = parse_config(
        {"models": [{"name": "g", "source": str(source), "task": "causal-lm", "device": "cuda"}]}
    )
    # Preparation reads config.json only, so it runs without a GPU.
    assert prepare_model(on_cuda.models[0], on_cuda).spec.dtype == "bfloat16"
    on_cpu = parse_config({"models": [{"name": "g", "source": str(source), "task": "causal-lm"}]})
    registry = ModelRegistry(on_cpu)
    registry.prepare()
    registry.load_all()
    registry.close()
    loaded = registry.entry("g").loaded
    assert loaded is not None, registry.entry("g").error
    assert loaded.dtype == torch.float32 and loaded.spec.dtype == "float32"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}


def test_tf32_switch() -> None:
    assert (
        parse_config({"models": [{"name": "m", "source": "/m", "task": "embedding"}]}).tf32 is False
    )
    try:
        set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        set_tf32(False)
