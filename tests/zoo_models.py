"""The model zoo: one tiny checkpoint per architecture (and per legacy layout), written by
transformers' own ``save_pretrained`` from a tiny config, for the coverage matrix in
test_zoo.py. ``python -m tests.zoo_models --markdown`` prints the supported-architectures
table from the same list (run from the repository root).

A checkpoint that ``save_pretrained`` writes is the layout transformers 5.23 publishes for
that architecture (for MoE models: per-expert keys, its reverse conversion). Legacy layouts
are the same tensors rewritten the way older hub checkpoints store them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models

VOCAB = tiny_models.VOCAB
_LM = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=101,
    eos_token_id=102,
    pad_token_id=0,
)
_ENC = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
)
_MOE = dict(_LM, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def _lm(**kw: Any) -> dict[str, Any]:
    return {**_LM, **kw}


def _drop(kw: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if k not in names}


# -- legacy layouts: edits of a save_pretrained state dict ---------------------------------
Edit = Callable[[dict[str, torch.Tensor]], None]


def strip_prefix(prefix: str) -> Edit:
    """A base-model checkpoint with no prefix (openai-community/gpt2 has no transformer.)."""

    def edit(t: dict[str, torch.Tensor]) -> None:
        for k in list(t):
            if k.startswith(prefix):
                t[k.removeprefix(prefix)] = t.pop(k)

    edit.__name__ = "noprefix"
    return edit


def gamma_beta(t: dict[str, torch.Tensor]) -> None:
    """TF-era BERT checkpoints: LayerNorm.gamma / LayerNorm.beta."""
    for k in list(t):
        if "LayerNorm" in k and k.endswith(".weight"):
            t[k.removesuffix(".weight") + ".gamma"] = t.pop(k)
        elif "LayerNorm" in k and k.endswith(".bias"):
            t[k.removesuffix(".bias") + ".beta"] = t.pop(k)


def fused_experts(t: dict[str, torch.Tensor]) -> None:
    """Marker: the checkpoint is written in the model's own (fused) layout instead."""


@dataclass(frozen=True)
class Arch:
    """One row of the matrix: ``name`` is the model_type, ``layout`` what is special about
    the checkpoint (``save_pretrained`` unless a legacy edit applies)."""

    name: str
    task: str  # embedding | causal-lm
    config: Callable[[], transformers.PretrainedConfig]
    layout: str = "save_pretrained"
    edit: Edit | None = None
    dtype: str = "float32"
    pooling: str = "mean"
    notes: str = ""
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        variant = f"-{self.edit.__name__}" if self.edit else ""
        return f"{self.name}-{'embed' if self.task == 'embedding' else 'lm'}{variant}"


def model_class(task: str) -> Any:
    return transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel


def build(arch: Arch, dest: Path, seed: int = 0) -> Path:
    """Write ``arch``'s tiny checkpoint (weights, config, the bundled WordPiece tokenizer)."""
    torch.manual_seed(seed)
    dtype = getattr(torch, arch.dtype)
    model = model_class(arch.task).from_config(arch.config(), dtype=dtype)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tiny_models.copy_tokenizer(dest)
    f = dest / "model.safetensors"
    if arch.edit is fused_experts:  # the model's own keys, as a fused-layout hub checkpoint
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, f, metadata={"format": "pt"})
    elif arch.edit is not None:
        tensors = dict(load_file(f))
        arch.edit(tensors)
        save_file(tensors, f, metadata={"format": "pt"})
    return dest


def markdown() -> str:
    """The supported-architectures table (README), from the matrix test_zoo.py runs."""
    rows = [
        "| model_type | task | checkpoint layout | dtype tested | notes |",
        "|---|---|---|---|---|",
    ]
    from zoo_archs import ARCHS

    for a in ARCHS:
        task = "embeddings" if a.task == "embedding" else "log-probs"
        if a.task == "embedding":
            task += f" ({a.pooling} pooling)"
        rows.append(f"| {a.name} | {task} | {a.layout} | {a.dtype} | {a.notes} |")
    rows.append("")
    rows.append(
        "Every row is a test in tests/test_zoo.py: the checkpoint loaded by modelcache equals "
        "`from_pretrained` (state dict bit-identical; outputs through the serving code: "
        "embeddings cos >= 0.9999, log-probs |Δ| <= 1e-4 in float32). Every save_pretrained "
        "row is also quantized one way (FP8 + quantization_config, int8 + scales, GPTQ-style "
        "int32 qweight, bitsandbytes-style uint8; rotating over the rows, with allow lists "
        "that try to wave it through) and refused as `unsupported_quantization`."
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    args = parser.parse_args()
    if args.markdown:
        print(markdown())
    else:
        from zoo_archs import ARCHS

        for a in ARCHS:
            print(a.id, a.layout)


if __name__ == "__main__":
    main()
