"""Helpers for loader tests: load one model through the real registry, read metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from modelcache.config import parse_config
from modelcache.daemon.registry import ModelEntry, ModelRegistry
from modelcache.metrics import DAEMON_REGISTRY


def spec(name: str, path: Path, task: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "source": str(path), "task": task, **kw}


def load_one(path: Path, task: str, **kw: Any) -> ModelEntry:
    """Prepare + load a single model through the registry; return its final entry."""
    registry = ModelRegistry(parse_config({"models": [spec("m", path, task, **kw)]}))
    registry.prepare()
    try:
        return registry.load_all()[0]
    finally:
        registry.close()


def metric(name: str, **labels: str) -> float:
    value = DAEMON_REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def rewrite_checkpoint(path: Path, edit: Any) -> None:
    """Load model.safetensors, let ``edit(dict)`` change it, save it back."""
    f = path / "model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(f).items()}
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    with torch.inference_mode():
        out = model(**inputs)
    return (out.logits if task == "causal-lm" else out.last_hidden_state).float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
