"""Stage 1 of a load, on the main thread: find the files, read the config, pick the class.

Everything here touches transformers' lazy module machinery (AutoConfig, the auto class
mappings, tokenizers), which is not thread-safe on first use (seed 003), so the registry
runs it for every configured model before any worker thread starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
)

from modelcache.config import DaemonConfig, ModelSpec, resolve_dtype
from modelcache.daemon import quantization, stmodules
from modelcache.daemon.errors import ModelLoadError
from modelcache.daemon.weights import Shard, find_shards, read_header

DEFAULT_MODEL_ROOT = Path("/models")
_AUTO_CLASSES = {"embedding": AutoModel, "causal-lm": AutoModelForCausalLM}
_AUTO_NAMES = {"embedding": "AutoModel", "causal-lm": "AutoModelForCausalLM"}


@dataclass
class PreparedModel:
    """Everything a load needs, resolved up front; the weights are not read yet."""

    spec: ModelSpec
    path: Path
    config: Any  # transformers.PretrainedConfig
    model_class: type
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    shards: list[Shard]
    revision: str
    resolve_seconds: float
    #: Pooling, Dense, Normalize and prompts (the checkpoint's sentence-transformers
    #: modules where it has them); None for causal-lm models.
    recipe: stmodules.Recipe | None = None


def hub_dir(root: Path, source: str, revision: str) -> Path:
    """Where ``modelcache download`` puts a hub model: ROOT/<org>/<name>/<revision>."""
    return root.joinpath(*source.split("/"), revision)


def model_dir(spec: ModelSpec, config: DaemonConfig) -> Path:
    """The model's directory, confined to ``model_root`` when one is configured.

    Paths are compared after resolving symlinks, so neither ``../`` nor a symlink can
    reach outside the model volume.
    """
    root = config.model_root
    if spec.is_hub_id:
        assert spec.revision is not None  # enforced by ModelSpec
        path = hub_dir(root or DEFAULT_MODEL_ROOT, spec.source, spec.revision)
    else:
        path = Path(spec.source)
        if root is not None and not path.is_absolute():
            path = root / path
    if root is not None:
        real_root = Path(os.path.realpath(root))
        real = Path(os.path.realpath(path))
        if real != real_root and real_root not in real.parents:
            raise ModelLoadError(
                "not_found",
                f"source {spec.source!r} resolves to {real}, outside the model volume "
                f"{real_root}; sources must stay inside model_root",
            )
    if not path.is_dir():
        hint = (
            f"; fetch it with: modelcache download {spec.source} --revision "
            f"{spec.revision} --to {root or DEFAULT_MODEL_ROOT}"
            if spec.is_hub_id
            else ""
        )
        raise ModelLoadError(
            "not_found",
            f"model directory {path} does not exist (looked for source {spec.source!r}){hint}",
        )
    return path


def _local_revision(path: Path, shards: list[Shard]) -> str:
    """A stable id for a local checkpoint: the manifest ``modelcache download`` wrote, or
    a digest of file names and sizes."""
    manifest = path / ".modelcache-manifest.json"
    if manifest.is_file():
        try:
            return str(json.loads(manifest.read_text())["revision"])
        except (OSError, ValueError, KeyError):
            pass
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{s.path.name}:{s.size};".encode())
    return "local-" + h.hexdigest()[:16]


def _classify(exc: Exception, spec: ModelSpec, path: Path) -> ModelLoadError:
    msg = str(exc)
    if "trust_remote_code" in msg:
        return ModelLoadError(
            "remote_code",
            f"{path} needs custom code from the checkpoint to load; modelcache never runs it "
            "unless the model sets trust_remote_code: true (review the code first)",
        )
    return ModelLoadError("bad_config", f"{path}: cannot read config.json ({msg.splitlines()[0]})")


def native_model_type(path: Path) -> str | None:
    """config.json's model_type when transformers implements it itself (nomic_bert, gte,
    jina_embeddings_v3 are native in 5.23 although their hub configs carry an auto_map):
    then the native class is used and the checkpoint's code is never run, trusted or not."""
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return None
    native = CONFIG_MAPPING[model_type].__module__.startswith("transformers.")
    return model_type if native else None


def _model_class(spec: ModelSpec, hf_config: Any, path: Path, native: bool = False) -> type:
    auto_map = {} if native else getattr(hf_config, "auto_map", None) or {}
    name = _AUTO_NAMES[spec.task]
    if auto_map:
        if not spec.trust_remote_code:
            raise ModelLoadError(
                "remote_code",
                f"{path}/config.json maps {sorted(auto_map)} to custom code; set "
                "trust_remote_code: true for this model to allow running it",
            )
        if name in auto_map:
            from transformers.dynamic_module_utils import get_class_from_dynamic_module

            cls: type = get_class_from_dynamic_module(
                auto_map[name], str(path), local_files_only=True
            )
            return cls
    mapping = _AUTO_CLASSES[spec.task]._model_mapping  # type: ignore[attr-defined]
    try:
        return mapping[type(hf_config)]  # type: ignore[no-any-return,index]
    except KeyError:
        arch = getattr(hf_config, "model_type", "?")
        raise ModelLoadError(
            "bad_config",
            f"model type {arch!r} has no {name} class in transformers "
            f"{transformers.__version__}; is task {spec.task!r} right for this checkpoint?",
        ) from None


def prepare_model(spec: ModelSpec, config: DaemonConfig) -> PreparedModel:
    started = time.perf_counter()
    path = model_dir(spec, config)
    kwargs = {"local_files_only": True, "trust_remote_code": spec.trust_remote_code}
    if not (path / "config.json").is_file():
        raise ModelLoadError("not_found", f"{path} has no config.json")
    native = native_model_type(path) is not None
    try:
        hf_config = AutoConfig.from_pretrained(
            str(path), **{**kwargs, "trust_remote_code": spec.trust_remote_code and not native}
        )
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise _classify(exc, spec, path) from None
    quantization.check_config(path, hf_config)
    spec = resolve_dtype(spec, getattr(hf_config, "dtype", None))  # "auto" -> concrete
    model_class = _model_class(spec, hf_config, path, native)
    try:
        # The config already resolved (natively where possible): the tokenizer must not
        # re-resolve it through auto_map. Its own custom code still needs trust.
        tokenizer = AutoTokenizer.from_pretrained(str(path), config=hf_config, **kwargs)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise ModelLoadError("bad_config", f"{path}: cannot load the tokenizer ({exc})") from None
    shards = [read_header(p) for p in find_shards(path)]
    quantization.check_headers(shards)
    recipe = None
    if spec.task == "embedding":
        hidden = int(getattr(hf_config.get_text_config(), "hidden_size", 0) or 0)
        recipe = stmodules.recipe(path, spec, hidden)
        if recipe.lowercase:
            stmodules.lowercase_tokenizer(tokenizer)
    revision = spec.revision or _local_revision(path, shards)
    return PreparedModel(
        spec=spec,
        path=path,
        config=hf_config,
        model_class=model_class,
        tokenizer=tokenizer,
        shards=shards,
        revision=revision,
        resolve_seconds=time.perf_counter() - started,
        recipe=recipe,
    )
