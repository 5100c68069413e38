"""Checkpoints that are wrong on purpose, for the hardening tests (issue #6).

Built from ``tiny_models`` (real save_pretrained checkpoints) and then damaged, or given a
tokenizer that adds no special tokens, or made big enough that loading takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import tiny_models
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from modelcache.examples import bundled_minilm

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def bare_tokenizer(dest: Path) -> Path:
    """Replace dest's tokenizer by the same WordPiece vocabulary with no special tokens:
    whitespace, control or combining characters alone become zero tokens."""
    vocab = Tokenizer.from_file(str(bundled_minilm() / "tokenizer.json")).get_vocab()
    for name in _TOKENIZER_FILES:
        (dest / name).unlink(missing_ok=True)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]"
    ).save_pretrained(dest)
    return dest


def small_vocab_tokenizer(dest: Path, size: int, special_tokens: bool = True) -> Path:
    """The bundled WordPiece vocabulary cut to its first ``size`` entries (the five special
    tokens, every single character, the most frequent words), re-numbered from 0; with or
    without [CLS] ... [SEP] around every input."""
    full = Tokenizer.from_file(str(bundled_minilm() / "tokenizer.json")).get_vocab()
    keep = [t for t in sorted(full, key=full.__getitem__) if not t.startswith("[unused")]
    vocab = {t: i for i, t in enumerate(keep[:size])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if special_tokens:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    ).save_pretrained(dest)
    return dest


def small_gpt2(
    dest: Path, *, vocab: int = 2048, special_tokens: bool = True, seed: int = 0
) -> Path:
    """A 2-layer GPT-2 over a ``vocab``-token vocabulary: the [B, T, V] log-prob work per
    token is 15x smaller than over the full 30522, which keeps a 10k-request fuzz fast."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=2,
        eos_token_id=3,
    )
    dest.mkdir(parents=True, exist_ok=True)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(dest)
    return small_vocab_tokenizer(dest, vocab, special_tokens)


def copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _header(f: Path) -> tuple[int, dict[str, dict[str, object]]]:
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8 : 8 + n])


def truncate_weights(path: Path, keep_fraction: float = 0.6) -> Path:
    """Cut model.safetensors inside its tensor data (the header stays intact)."""
    f = path / "model.safetensors"
    os.truncate(f, int(f.stat().st_size * keep_fraction))
    return f


def garble_header(path: Path) -> Path:
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\x00garbage"
    f.write_bytes(bytes(data))
    return f


def poison_tensor(path: Path, name_part: str = "wte") -> str:
    """Overwrite one tensor's bytes in place with NaN (same size, valid header): the file
    parses, the model builds, only the checks on its values can notice. Returns its name."""
    f = path / "model.safetensors"
    n, header = _header(f)
    name = next(k for k in header if k != "__metadata__" and name_part in k)
    start, end = header[name]["data_offsets"]  # type: ignore[misc]
    nan = struct.pack("<f", float("nan"))
    with f.open("r+b") as fh:
        fh.seek(8 + n + int(start))
        fh.write(nan * ((int(end) - int(start)) // 4))
    return name


def remove_weights(path: Path) -> None:
    (path / "model.safetensors").unlink()


def needs_remote_code(path: Path) -> Path:
    """A checkpoint of a model_type transformers does not know, whose config maps to code
    shipped next to it (a natively known model_type loads natively whatever its auto_map
    says); the code would end the process if it ever ran."""
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "evil_" + cfg["model_type"]
    cfg["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModel": "modeling_evil.EvilModel",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    (path / "config.json").write_text(json.dumps(cfg))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (path / name).write_text("import os\nos._exit(97)\n")
    return path


def big_gpt2(root: Path, size_mb: int = 400) -> Path:
    """A GPT-2 of about ``size_mb`` MB (float32, random weights), built once under ``root``
    and reused: loading it takes seconds, long enough to be interrupted."""
    width = 1024
    per_layer = 12 * width * width * 4
    layers = max(1, round((size_mb * 2**20 - tiny_models.VOCAB * width * 4) / per_layer))
    path = root / f"gpt2-{width}x{layers}"
    if not (path / "model.safetensors").is_file():
        tmp = root / f".{path.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(
            vocab_size=tiny_models.VOCAB,
            n_positions=512,
            n_embd=width,
            n_layer=layers,
            n_head=16,
            bos_token_id=101,
            eos_token_id=102,
        )
        tmp.mkdir(parents=True)
        transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp)
        tiny_models.copy_tokenizer(tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)  # atomic: a half-written cache is never reused
    return path
