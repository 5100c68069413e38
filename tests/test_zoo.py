"""The coverage matrix (issue 11): every architecture of tests/zoo_archs.py, in the layout
transformers 5.23 writes and in legacy layouts, loads through the registry with exactly the
weights ``from_pretrained`` gives and serves the same outputs through the compute code; the
same checkpoint quantized is refused, whatever the allow lists say."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import zoo_models
from loader_helpers import load_one
from safetensors.torch import load_file, save_file
from zoo_archs import ARCHS
from zoo_models import Arch

from modelcache.daemon.inference import EmbedItem, ModelCompute
from modelcache.daemon.logstats import LogProbsItem, LogProbsOptions
from modelcache.daemon.registry import ModelState

TEXT = "modelcache loads every model exactly once, with the weights it was given."


def _ids(path: Path) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(str(path))(TEXT)["input_ids"])


def _reference(path: Path, arch: Arch) -> Any:
    cls = zoo_models.model_class(arch.task)
    return cls.from_pretrained(str(path), dtype=getattr(torch, arch.dtype)).eval()


def _spec(arch: Arch) -> dict[str, Any]:
    extra: dict[str, Any] = {"dtype": arch.dtype, **arch.spec}
    if arch.task == "embedding":
        extra["pooling"] = arch.pooling
    return extra


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.id)
def test_loads_exactly_what_from_pretrained_loads(tmp_path: Path, arch: Arch) -> None:
    path = zoo_models.build(arch, tmp_path / arch.id)
    entry = load_one(path, arch.task, **_spec(arch))
    assert entry.state is ModelState.READY, entry.error
    lm = entry.loaded
    assert lm is not None
    ref = _reference(path, arch)
    ours, theirs = lm.model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k
    ids = _ids(path)
    compute = ModelCompute(lm)
    with torch.inference_mode():
        out = ref(input_ids=torch.tensor([ids]))
    if arch.task == "embedding":
        (got,) = compute.run([EmbedItem(ids=ids, normalize=True)])
        hidden = out.last_hidden_state[0].float()
        pooled = hidden[-1] if arch.pooling == "last" else hidden.mean(0)
        want = torch.nn.functional.normalize(pooled, dim=-1)
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(got), want, dim=0)
        assert float(cos) >= 0.9999
    else:
        (stats,) = compute.run([LogProbsItem(ids=ids, options=LogProbsOptions())])
        logp = torch.log_softmax(out.logits[0].float(), dim=-1)[:-1]
        want = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        tol = 1e-4 if arch.dtype == "float32" else 2e-2
        assert float((torch.from_numpy(stats.logprobs) - want).abs().max()) <= tol


# -- quantized checkpoints ------------------------------------------------------------------


def _victim(tensors: dict[str, torch.Tensor]) -> str:
    """The largest 2-D weight that is not an embedding or head: what a quantizer packs."""
    skip = ("embed", "wte", "wpe", "lm_head", "word", "position")
    keys = [
        k
        for k, t in tensors.items()
        if t.dim() == 2 and k.endswith("weight") and not any(s in k for s in skip)
    ]
    return max(keys, key=lambda k: (tensors[k].numel(), k))


def _fp8(t: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, Any]:
    k = _victim(t)
    t[k] = t[k].to(torch.float8_e4m3fn)
    t[k + "_scale_inv"] = torch.ones(1)
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    return {"allow_unexpected": [r"weight_scale_inv$"]}


def _int8(t: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, Any]:
    k = _victim(t)
    t[k] = (t[k] * 127).round().clamp(-127, 127).to(torch.int8)  # no config, scales "allowed"
    t[k.removesuffix("weight") + "weight_scale"] = torch.ones(t[k].shape[0])
    return {"allow_unexpected": [r"weight_scale$"]}


def _gptq(t: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, Any]:
    k = _victim(t)
    out, inp = t.pop(k).shape
    base = k.removesuffix("weight")
    t[base + "qweight"] = torch.zeros(max(inp // 8, 1), out, dtype=torch.int32)
    t[base + "qzeros"] = torch.zeros(1, max(out // 8, 1), dtype=torch.int32)
    t[base + "scales"] = torch.ones(1, out, dtype=torch.float16)
    # Everything an operator could try to wave it through with:
    return {"allow_missing": [".*"], "allow_unexpected": [r"\.(qweight|qzeros|scales)$"]}


def _bnb4(t: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, Any]:
    k = _victim(t)
    n = t[k].numel()
    t[k] = torch.zeros(n // 2, 1, dtype=torch.uint8)
    t[k + ".absmax"] = torch.ones(max(n // 64, 1))
    return {"allow_unexpected": [r"\.absmax$"]}


KINDS = {"fp8": _fp8, "int8": _int8, "gptq": _gptq, "bnb4": _bnb4}


@pytest.mark.parametrize(
    ("arch", "kind"),
    [(a, list(KINDS)[i % len(KINDS)]) for i, a in enumerate(ARCHS) if a.edit is None],
    ids=lambda x: x.id if isinstance(x, Arch) else x,
)
def test_a_quantized_checkpoint_is_refused(tmp_path: Path, arch: Arch, kind: str) -> None:
    path = zoo_models.build(arch, tmp_path / arch.id)
    f, c = path / "model.safetensors", path / "config.json"
    tensors, cfg = dict(load_file(f)), json.loads(c.read_text())
    allow = KINDS[kind](tensors, cfg)
    save_file(tensors, f, metadata={"format": "pt"})
    c.write_text(json.dumps(cfg))
    entry = load_one(path, arch.task, **_spec(arch), **allow)
    assert entry.state is ModelState.FAILED
    assert entry.error_class == "unsupported_quantization", entry.error
