"""Regressions found in review: each was reproduced before the fix."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import tiny_models
import torch
import transformers
from loader_helpers import load_one, outputs, rewrite_checkpoint, spec

from modelcache.config import parse_config
from modelcache.daemon import registry as registry_module
from modelcache.daemon.errors import ModelLoadError
from modelcache.daemon.registry import ModelRegistry, ModelState


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gptj_position_table_is_computed_in_float32(tmp_path: Path, dtype: str) -> None:
    """GPT-J computes its sinusoidal table in __init__ from the default dtype; built under
    a bf16 default it was off by up to 0.36 and the load still passed."""
    torch.manual_seed(0)
    cfg = transformers.GPTJConfig(
        vocab_size=tiny_models.VOCAB,
        n_positions=2048,
        n_embd=64,
        n_layer=2,
        n_head=4,
        rotary_dim=16,
        bos_token_id=101,
        eos_token_id=102,
    )
    path = tmp_path / "gptj"
    transformers.GPTJForCausalLM(cfg).save_pretrained(path)
    tiny_models.copy_tokenizer(path)
    lm = load_one(path, "causal-lm", dtype=dtype).loaded
    assert lm is not None
    ref = tiny_models.reference(path, "causal-lm", dtype=getattr(torch, dtype))
    ours = dict(lm.model.named_buffers())
    for name, buf in ref.named_buffers():
        assert ours[name].dtype == buf.dtype and torch.equal(ours[name], buf), name
    inputs = tiny_models.encode(path)
    assert torch.equal(outputs(lm.model, inputs, "causal-lm"), outputs(ref, inputs, "causal-lm"))


def _slow_loads(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    real = registry_module.load_model

    def slow(prepared):  # type: ignore[no-untyped-def]
        time.sleep(seconds)  # test-only: keeps the load in flight while callers arrive
        return real(prepared)

    monkeypatch.setattr(registry_module, "load_model", slow)


def test_one_cancelled_waiter_does_not_cancel_the_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _slow_loads(monkeypatch, 0.5)
    r = ModelRegistry(
        parse_config({"models": [spec("m", tiny_models.bert(tmp_path / "b"), "embedding")]})
    )
    r.prepare()

    async def main() -> list[object]:
        patient = asyncio.create_task(r.aget("m"))
        impatient = asyncio.create_task(asyncio.wait_for(r.aget("m"), 0.05))
        return await asyncio.gather(patient, impatient, return_exceptions=True)

    patient, impatient = asyncio.run(main())
    assert isinstance(impatient, TimeoutError)
    assert patient is r.get("m") and r.load_count["m"] == 1
    r.close()


def test_close_fails_queued_waiters_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _slow_loads(monkeypatch, 0.5)
    path = tiny_models.bert(tmp_path / "b")
    r = ModelRegistry(
        parse_config({"models": [spec("a", path, "embedding"), spec("b", path, "embedding")]})
    )
    r.prepare()
    running = r.load_async("a")
    queued = r.load_async("b")
    deadline = time.monotonic() + 10  # "a" is running (not merely queued) when close() comes
    while r.entry("a").state is not ModelState.LOADING and time.monotonic() < deadline:
        time.sleep(0.01)
    r.close()
    with pytest.raises(ModelLoadError, match="shutting down"):
        queued.result(timeout=5)
    with pytest.raises(ModelLoadError, match="shutting down"):
        r.get("b", timeout=5)
    # The running load finishes in the background; wait for it, because it patches
    # transformers' process-global init functions while it builds the model and the
    # next test builds checkpoints in this process.
    assert running.result(timeout=60).spec.name == "a"


def test_malformed_config_json_fails_that_model_only(tmp_path: Path) -> None:
    bad = tiny_models.bert(tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_attention_heads"] = "four"
    (bad / "config.json").write_text(json.dumps(cfg))
    r = ModelRegistry(
        parse_config(
            {
                "models": [
                    spec("bad", bad, "embedding"),
                    spec("good", tiny_models.bert(tmp_path / "g"), "embedding"),
                ]
            }
        )
    )
    r.prepare()
    states = {e.spec.name: (e.state, e.error_class) for e in r.load_all()}
    r.close()
    assert states == {"bad": (ModelState.FAILED, "bad_config"), "good": (ModelState.READY, "")}


def test_shard_index_cannot_point_outside_the_model(tmp_path: Path) -> None:
    path = tiny_models.bert(tmp_path / "b")
    outside = tmp_path / "outside.safetensors"
    (path / "model.safetensors").rename(outside)
    keys = json.loads(
        outside.read_bytes()[8 : 8 + int.from_bytes(outside.read_bytes()[:8], "little")]
    )
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: str(outside) for k in keys if k != "__metadata__"}})
    )
    entry = load_one(path, "embedding")
    assert entry.error_class == "corrupt_weights" and "not a plain file name" in entry.error


def test_legacy_gpt2_attention_masks_in_the_checkpoint_are_ignored(tmp_path: Path) -> None:
    """openai-community/gpt2's file has h.N.attn.bias / masked_bias buffers and no prefix;
    transformers declares them ignorable (_keys_to_ignore_on_load_unexpected)."""
    path = tiny_models.gpt2(tmp_path / "g")

    def legacy(t: dict[str, torch.Tensor]) -> None:
        for k in list(t):
            t[k.removeprefix("transformer.")] = t.pop(k)
        for i in range(2):
            t[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 256, 256))
            t[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)

    rewrite_checkpoint(path, legacy)
    entry = load_one(path, "causal-lm")
    # attn.bias is declared ignorable by the model class; masked_bias is not (transformers
    # only warns about it): modelcache says so and lets the config accept it explicitly.
    assert entry.error_class == "unexpected_weights" and "masked_bias" in entry.error
    assert "attn.bias," not in entry.error
    entry = load_one(path, "causal-lm", allow_unexpected=[r"\.attn\.masked_bias$"])
    assert entry.state is ModelState.READY, entry.error
