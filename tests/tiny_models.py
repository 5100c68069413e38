"""Tiny real models built from transformers configs and saved with save_pretrained.

No weights come from a hub: each builder seeds torch, instantiates the architecture with
random weights and writes a real checkpoint (safetensors + tokenizer) to a directory.
The tokenizer is the bundled MiniLM's WordPiece tokenizer (vocab 30522), so every model
here can use it; tiny vocabularies are avoided for that reason.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer

from modelcache.examples import bundled_minilm

VOCAB = 30522
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def copy_tokenizer(dest: Path) -> None:
    src = bundled_minilm()
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dest / name)


def _save(model: transformers.PreTrainedModel, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    copy_tokenizer(dest)
    return dest


def gpt2(dest: Path, *, tied: bool = True, layers: int = 2, width: int = 64, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=256,
        n_embd=width,
        n_layer=layers,
        n_head=4,
        tie_word_embeddings=tied,
        bos_token_id=101,
        eos_token_id=102,
    )
    return _save(transformers.GPT2LMHeadModel(cfg), dest)


def llama(dest: Path, *, seed: int = 1, width: int = 64) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=width * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=101,
        eos_token_id=102,
        pad_token_id=0,
    )
    return _save(transformers.LlamaForCausalLM(cfg), dest)


def bert(dest: Path, *, seed: int = 2) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=256,
    )
    return _save(transformers.BertModel(cfg), dest)


def roberta(dest: Path, *, seed: int = 3) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=258,
        pad_token_id=1,
    )
    return _save(transformers.RobertaModel(cfg), dest)


def reference(path: Path, task: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The same checkpoint loaded the ordinary way, as a reference for outputs."""
    cls = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
    model = cls.from_pretrained(str(path), dtype=dtype)
    return model.eval()


def encode(path: Path, text: str = "modelcache loads every model exactly once.") -> dict:
    tok = AutoTokenizer.from_pretrained(str(path))
    enc = tok(text, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
