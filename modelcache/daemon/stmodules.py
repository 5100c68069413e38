"""A checkpoint's sentence-transformers modules: how it was trained to turn tokens into one
vector (issue 11, "embeddings as trained").

Measured: a CLS-pooled BGE served with the YAML's default ``mean`` gives plausible, wrong
vectors, and a model with a Dense projection (EmbeddingGemma) or named prompts (E5's
"query: ") cannot be served faithfully from the transformer body alone. When the model
directory has ``modules.json``, its modules therefore define the recipe: pooling mode(s),
Dense projections (weights read here, from safetensors only, shapes checked), a final
Normalize, the tokenizer's max_seq_length and lowercasing, and the named prompts of
``config_sentence_transformers.json``. Anything in the chain this module does not
understand fails the load: serving without it would silently change the vectors.

Parsing and checks live here; the arithmetic stays in inference.py (``ModelCompute``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from modelcache.config import ModelSpec
from modelcache.daemon.errors import ModelLoadError
from modelcache.daemon.weights import read_header, read_shard

#: sentence-transformers pooling modes -> the names inference.pool and the YAML use.
POOLING = {
    "cls": "cls",
    "max": "max",
    "mean": "mean",
    "mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "weightedmean": "weightedmean",
    "lasttoken": "last",
}
#: Legacy 1_Pooling flags, in the order sentence-transformers concatenates their outputs.
LEGACY_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
#: Dense activations by torch class name. A fixed list: the config names a class to import,
#: and importing what a checkpoint names is code execution.
ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU")


@dataclass(frozen=True)
class DenseLayer:
    """One Dense module: ``activation(x @ weight.T + bias)`` (+ x or x @ residual.T)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    activation: str
    residual: torch.Tensor | None = None
    use_residual: bool = False

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])


@dataclass(frozen=True)
class Recipe:
    """What turns the model's last hidden states into served vectors."""

    pooling: tuple[str, ...]
    normalize: bool
    dense: tuple[DenseLayer, ...] = ()
    prompts: Mapping[str, str] = field(default_factory=dict)
    default_prompt_name: str = ""
    max_seq_length: int | None = None
    lowercase: bool = False
    #: "sentence-transformers" when modules.json defined it, else "config".
    source: str = "config"

    def dims(self, hidden: int) -> int:
        return self.dense[-1].out_features if self.dense else hidden * len(self.pooling)


def from_spec(spec: ModelSpec) -> Recipe:
    """Today's behaviour for a checkpoint without modules: the YAML, or mean and true."""
    normalize = True if spec.normalize is None else spec.normalize
    return Recipe(pooling=(spec.pooling or "mean",), normalize=normalize)


def _bad(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError("bad_config", f"{path}: {what}")


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _bad(path, f"unreadable sentence-transformers file ({exc})") from None
    if not isinstance(data, dict):
        raise _bad(path, "is not a JSON object")
    return data


def _pooling(path: Path, cfg: dict[str, Any], hidden: int) -> tuple[str, ...]:
    mode = cfg.get("pooling_mode")
    if mode is None:
        mode = [m for k, m in LEGACY_FLAGS.items() if cfg.get(k)] or ["mean"]
    modes = [mode] if isinstance(mode, str) else mode
    if not isinstance(modes, list) or not modes or any(m not in POOLING for m in modes):
        raise _bad(path, f"pooling_mode {mode!r} is not one of {sorted(POOLING)}")
    if cfg.get("include_prompt", True) is not True:
        raise _bad(path, "include_prompt false (prompt tokens left out of pooling) is unsupported")
    width = cfg.get("embedding_dimension", cfg.get("word_embedding_dimension", hidden))
    if width != hidden:
        raise _bad(path, f"embedding_dimension {width} differs from the model's hidden {hidden}")
    return tuple(POOLING[m] for m in modes)


def _dense(path: Path, width: int) -> DenseLayer:
    """A Dense module's config and safetensors weights, checked against ``width`` (the
    input it will get) before any arithmetic could broadcast a wrong shape."""
    cfg = _json(path / "config.json")
    act = str(cfg.get("activation_function", "torch.nn.modules.activation.Tanh"))
    short = act.rsplit(".", 1)[-1]
    if not act.startswith("torch.") or short not in ACTIVATIONS:
        raise _bad(path, f"activation_function {act!r} is not one of torch.nn {ACTIVATIONS}")
    for key in ("module_input_name", "module_output_name"):
        if cfg.get(key, "sentence_embedding") != "sentence_embedding":
            raise _bad(path, f"{key} {cfg[key]!r}: only sentence embeddings are served")
    n_in, n_out, bias = cfg.get("in_features"), cfg.get("out_features"), cfg.get("bias", True)
    if n_in != width or not isinstance(n_out, int) or n_out < 1:
        raise _bad(path, f"in/out_features {n_in}/{n_out} do not follow the {width}-wide input")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise _bad(path, "has no model.safetensors (pickle weights are never loaded)")
    tensors = read_shard(read_header(weights), threads=1)
    residual = bool(cfg.get("use_residual", False)) and n_in != n_out
    want = {"linear.weight": (n_out, n_in)} | ({"linear.bias": (n_out,)} if bias else {})
    want |= {"residual.weight": (n_out, n_in)} if residual else {}
    got = {k: tuple(t.shape) for k, t in tensors.items()}
    if got != want:
        raise _bad(weights, f"tensors {got} do not match the config's {want}")
    if not all(t.is_floating_point() and bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise ModelLoadError("verify_failed", f"{weights}: non-finite or non-float Dense weights")
    return DenseLayer(
        weight=tensors["linear.weight"],
        bias=tensors.get("linear.bias"),
        activation=short,
        residual=tensors.get("residual.weight"),
        use_residual=bool(cfg.get("use_residual", False)),
    )


def _prompts(path: Path) -> tuple[dict[str, str], str]:
    cfg = _json(path) if path.is_file() else {}
    prompts, default = cfg.get("prompts") or {}, cfg.get("default_prompt_name") or ""
    if not isinstance(prompts, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
    ):
        raise _bad(path, "prompts must map names to strings")
    if default and default not in prompts:
        raise _bad(path, f"default_prompt_name {default!r} is not among prompts {sorted(prompts)}")
    return prompts, str(default)


def read_modules(path: Path, hidden: int) -> Recipe | None:
    """The recipe that ``path``'s modules.json describes, or None without one."""
    listing = path / "modules.json"
    if not listing.is_file():
        return None
    try:
        modules = json.loads(listing.read_text(encoding="utf-8"))
        kinds = [(str(m["type"]).rsplit(".", 1)[-1], str(m.get("path", ""))) for m in modules]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _bad(listing, f"unreadable ({exc})") from None
    names = [k for k, _ in kinds]
    if names[:2] != ["Transformer", "Pooling"] or kinds[0][1] not in ("", "."):
        raise _bad(listing, f"modules {names} must start with Transformer (at the root), Pooling")
    pooling = _pooling(path / kinds[1][1], _json(path / kinds[1][1] / "config.json"), hidden)
    dense: list[DenseLayer] = []
    width = hidden * len(pooling)
    for i, (kind, sub) in enumerate(kinds[2:], start=2):
        if kind == "Dense":
            dense.append(_dense(path / sub, width))
            width = dense[-1].out_features
        elif not (kind == "Normalize" and i == len(kinds) - 1):
            raise _bad(listing, f"module {i} ({kind}) in {names} is not supported by modelcache")
    bert = path / "sentence_bert_config.json"
    st_cfg = _json(bert) if bert.is_file() else {}
    max_seq = st_cfg.get("max_seq_length")
    prompts, default = _prompts(path / "config_sentence_transformers.json")
    return Recipe(
        pooling=pooling,
        normalize=names[-1] == "Normalize",
        dense=tuple(dense),
        prompts=prompts,
        default_prompt_name=default,
        max_seq_length=max_seq if isinstance(max_seq, int) and max_seq > 0 else None,
        lowercase=bool(st_cfg.get("do_lower_case", False)),
        source="sentence-transformers",
    )


def recipe(path: Path, spec: ModelSpec, hidden: int) -> Recipe:
    """The served recipe: the modules' where the checkpoint has them, with the YAML's
    explicit values checked against them (an unmarked contradiction fails the load)."""
    trained = read_modules(path, hidden) if spec.task == "embedding" else None
    if trained is None:
        return from_spec(spec)
    clash = []
    if spec.pooling is not None and (spec.pooling,) != trained.pooling:
        clash.append(f"pooling: {spec.pooling} (the checkpoint pools {'+'.join(trained.pooling)})")
    if spec.normalize is not None and spec.normalize != trained.normalize:
        has = "has a" if trained.normalize else "has no"
        clash.append(f"normalize: {str(spec.normalize).lower()} (the checkpoint {has} Normalize)")
    if not clash:
        return trained
    if not spec.override_sentence_transformers:
        raise _bad(
            path,
            f"{'; '.join(clash)} contradicts the checkpoint's sentence-transformers modules "
            "(modules.json), which say how it was trained to embed. Remove the setting to "
            "serve it as trained, or set override_sentence_transformers: true to serve the "
            "configured value on purpose",
        )
    pooling = (spec.pooling,) if spec.pooling else trained.pooling
    if trained.dense and len(pooling) != len(trained.pooling):
        raise _bad(path, f"pooling {spec.pooling} changes the width the Dense modules expect")
    normalize = trained.normalize if spec.normalize is None else spec.normalize
    return replace(trained, pooling=pooling, normalize=normalize)


def on_device(r: Recipe, device: torch.device, dtype: torch.dtype) -> Recipe:
    """The Dense weights where and in the dtype the model runs, as sentence-transformers
    runs them after ``model.to(dtype)``."""

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=dtype).contiguous()

    dense = tuple(
        replace(
            d,
            weight=d.weight.to(device=device, dtype=dtype).contiguous(),
            bias=move(d.bias),
            residual=move(d.residual),
        )
        for d in r.dense
    )
    return replace(r, dense=dense)


def fingerprint(digest: str, r: Recipe) -> str:
    """The body's fingerprint extended with the Dense weights, as read from their files."""
    h = hashlib.sha256(digest.encode())
    for d in r.dense:
        for t in (d.weight, d.bias, d.residual):
            if t is not None:
                h.update(repr((tuple(t.shape), str(t.dtype))).encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def lowercase_tokenizer(tokenizer: Any) -> None:
    """do_lower_case in sentence_bert_config.json: prepend a Lowercase normalizer to a fast
    tokenizer that lacks one, as sentence-transformers does when it loads the model."""
    from tokenizers.normalizers import Lowercase, Sequence

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelLoadError("bad_config", "do_lower_case needs a fast (tokenizers) tokenizer")
    current: Any = backend.normalizer
    nested = isinstance(current, Sequence)
    parts: list[Any] = [*iter(current)] if nested else [current] if current else []
    if not any(isinstance(n, Lowercase) for n in parts):
        backend.normalizer = Sequence([Lowercase(), *parts])
