"""The model directory the node tests mount into daemon pods (hostPath), and the in-process
reference numbers the pods' answers must equal."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import fault_models
import numpy as np
import tiny_models
import torch
import transformers

from modelcache.examples import bundled_minilm

MINILM, TINY_LM, BROKEN = "minilm", "tiny-llama", "broken"
TEXTS = ["a training pod asks for embeddings", "modelcache keeps models loaded"]


def write_models(root: Path) -> Path:
    """root/minilm (the bundled all-MiniLM-L6-v2), root/tiny-llama (a tiny causal LM) and
    root/broken (MiniLM with its weights cut short), readable by any uid (the daemon runs as
    10001 and mounts the directory read-only)."""
    shutil.copytree(bundled_minilm(), root / MINILM)
    tiny_models.llama(root / TINY_LM)
    shutil.copytree(bundled_minilm(), root / BROKEN)
    fault_models.truncate_weights(root / BROKEN)
    for d, _, files in os.walk(root):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    return root


def reference_embeddings(texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(bundled_minilm()), device="cpu")
    out: np.ndarray = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    return out


def reference_logprobs(path: Path, token_ids: np.ndarray) -> np.ndarray:
    """Observed-token log-probs of one sequence from an ordinary transformers forward."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    ids = torch.from_numpy(token_ids.astype(np.int64))[None]
    with torch.inference_mode():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    out: np.ndarray = lp.gather(-1, ids[0, 1:, None])[:, 0].numpy()
    return out
