"""Embeddings as trained (issue 11): a checkpoint's sentence-transformers modules decide
pooling, Dense projections, normalization and prompts, and what the daemon serves through
gRPC equals ``SentenceTransformer(dir).encode`` for each.

The checkpoints are tiny models that transformers' save_pretrained wrote, wrapped in
sentence-transformers modules and saved by ``SentenceTransformer.save`` (the reference
writes its own files, so the parsing is tested against the real layout).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import transformers
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import (
    Dense,
    Normalize,
    Pooling,
    Transformer,
)

from modelcache.client import ModelCacheClient, ModelCacheError
from modelcache.config import parse_config
from modelcache.daemon.errors import ModelLoadError
from modelcache.daemon.inference import EmbedItem, ModelCompute
from modelcache.daemon.loader import load_model
from modelcache.daemon.registry import ModelRegistry, ModelState
from modelcache.daemon.resolve import prepare_model
from modelcache.examples import bundled_minilm

pytest.register_assert_rewrite("serving_fixtures")
import tiny_models  # noqa: E402
import zoo_models  # noqa: E402
from serving_fixtures import RunningDaemon, model  # noqa: E402

Code = grpc.StatusCode
TEXTS = [
    "hello world",
    "a somewhat longer sentence about serving embeddings exactly as they were trained",
    "x",
    "Ünïcödé survives tokenization too.",
]
E5_PROMPTS = {"query": "query: ", "passage": "passage: "}


def _st(
    dest: Path,
    body: Path,
    mode: str,
    dense: list[Dense] | None = None,
    normalize: bool = False,
    **kw: Any,
) -> Path:
    t = Transformer(str(body))
    mods = [t, Pooling(t.get_embedding_dimension(), pooling_mode=mode), *(dense or [])]
    SentenceTransformer(
        modules=[*mods, *([Normalize()] if normalize else [])], device="cpu", **kw
    ).save(str(dest))
    return dest


def _decoder(dest: Path, config: Any) -> Path:
    return zoo_models.build(zoo_models.Arch(dest.name, "embedding", config), dest)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("st")
    bert = tiny_models.bert(root / "bert")
    qwen3 = _decoder(root / "qwen3", lambda: transformers.Qwen3Config(**zoo_models._lm(head_dim=8)))
    gemma = _decoder(
        root / "gemma3",
        lambda: transformers.Gemma3TextConfig(
            **zoo_models._lm(head_dim=8, sliding_window=16, use_bidirectional_attention=True)
        ),
    )
    torch.manual_seed(5)
    identity = torch.nn.Identity()
    return {
        # BGE: CLS pooling, normalized.
        "bge": _st(root / "bge", bert, "cls", normalize=True),
        # E5: mean pooling, "query: " / "passage: " prompts, no default.
        "e5": _st(root / "e5", bert, "mean", normalize=True, prompts=E5_PROMPTS),
        # Qwen3-Embedding: last token, an instruction as the default prompt.
        "qwen3": _st(
            root / "qwen3-st",
            qwen3,
            "lasttoken",
            normalize=True,
            prompts={"query": "Instruct: find the answer\nQuery: ", "document": ""},
            default_prompt_name="query",
        ),
        "max": _st(root / "max", bert, "max"),
        # A Dense with tanh and bias after weighted mean, not normalized.
        "wmean-dense": _st(
            root / "wmean",
            bert,
            "weightedmean",
            [Dense(64, 24, activation_function=torch.nn.Tanh())],
        ),
        # EmbeddingGemma: bidirectional gemma3_text, mean, two bias-free Dense, Normalize.
        "gemma": _st(
            root / "gemma-st",
            gemma,
            "mean",
            [
                Dense(32, 96, bias=False, activation_function=identity),
                Dense(96, 32, bias=False, activation_function=identity),
            ],
            normalize=True,
        ),
    }


@pytest.fixture(scope="module")
def served(checkpoints: dict[str, Path]) -> Iterator[RunningDaemon]:
    models = [model(n, p, "embedding") for n, p in checkpoints.items()]
    models.append(model("minilm", bundled_minilm(), "embedding"))
    config = parse_config({"models": models})
    registry = ModelRegistry(config)
    registry.prepare()
    registry.load_all()
    failed = {e.spec.name: e.error for e in registry.entries() if e.state is not ModelState.READY}
    assert not failed, failed
    running = RunningDaemon(config, registry)
    yield running
    running.stop()
    registry.close()


@pytest.fixture(scope="module")
def client(served: RunningDaemon) -> Iterator[ModelCacheClient]:
    with ModelCacheClient(served.address, timeout=60) as c:
        yield c


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _reference(path: Path, texts: list[str], **kw: Any) -> np.ndarray:
    st = SentenceTransformer(str(path), device="cpu")
    out: np.ndarray = st.encode(texts, convert_to_numpy=True, **kw)
    return out


CASES = [
    ("bge", {}),
    ("e5", {"prompt_name": "query"}),
    ("e5", {"prompt_name": "passage"}),
    ("qwen3", {}),  # the default prompt applies
    ("qwen3", {"prompt_name": "document"}),
    ("max", {}),
    ("wmean-dense", {}),
    ("gemma", {}),
    ("minilm", {}),  # legacy 1_Pooling flags, sentence_bert_config max_seq_length 256
]


@pytest.mark.parametrize(("name", "kw"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_served_equals_sentence_transformers(
    name: str, kw: dict[str, str], client: ModelCacheClient, checkpoints: dict[str, Path]
) -> None:
    path = checkpoints.get(name, bundled_minilm())
    texts = [*TEXTS, "word " * 300]
    got = client.embed(name, texts, **kw)
    want = _reference(path, texts, **kw)
    assert got.shape == want.shape
    assert _cos(got, want).min() >= 0.9999, _cos(got, want)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=1e-4)


def test_the_recipe_is_what_the_modules_say(client: ModelCacheClient) -> None:
    info = {m.name: m for m in client.list_models().models}
    assert (info["bge"].pooling, info["bge"].normalize, info["bge"].output_dims) == (
        "cls",
        True,
        64,
    )
    assert (info["max"].pooling, info["max"].normalize) == ("max", False)
    assert info["qwen3"].pooling == "last"
    assert info["qwen3"].prompt_names == ("document", "query")
    assert info["qwen3"].default_prompt_name == "query"
    # sentence-transformers saves empty "query" and "document" prompts when none are given.
    assert info["e5"].prompt_names == ("document", "passage", "query")
    assert not info["e5"].default_prompt_name
    assert info["minilm"].prompt_names == ()
    assert (info["gemma"].output_dims, info["wmean-dense"].output_dims) == (32, 24)
    assert info["minilm"].max_length == 256  # sentence_bert_config.json's max_seq_length


def test_a_named_prompt_changes_the_vector(client: ModelCacheClient) -> None:
    plain = client.embed("e5", TEXTS)
    query = client.embed("e5", TEXTS, prompt_name="query")
    spelled = client.embed("e5", [f"query: {t}" for t in TEXTS])
    assert _cos(plain, query).max() < 0.9999
    np.testing.assert_allclose(query, spelled, atol=1e-6)


def test_unknown_prompt_name_is_invalid_argument_listing_the_prompts(
    client: ModelCacheClient,
) -> None:
    with pytest.raises(ModelCacheError) as info:
        client.embed("e5", TEXTS, prompt_name="qeury")
    assert info.value.code is Code.INVALID_ARGUMENT
    assert "'qeury'" in info.value.details
    assert "'document', 'passage', 'query'" in info.value.details
    with pytest.raises(ModelCacheError) as info:
        client.embed("minilm", TEXTS, prompt_name="query")
    assert info.value.code is Code.INVALID_ARGUMENT and "(none)" in info.value.details


def test_pre_tokenized_embed_equals_text(client: ModelCacheClient) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(str(bundled_minilm()))
    ids = tok(TEXTS)["input_ids"]
    by_ids = client.embed_result("bge", token_ids=ids)
    by_text = client.embed_result("bge", TEXTS)
    np.testing.assert_array_equal(by_ids.embeddings, by_text.embeddings)
    assert by_ids.token_counts.tolist() == [len(s) for s in ids]


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"token_ids": [[101, 2000, 30522, 102]]}, "token_ids[0][2] = 30522 is outside"),
        ({"token_ids": [[101, -1]]}, "token_ids[0][1] = -1 is outside"),
        ({"token_ids": [[]]}, "token_ids[0] is empty"),
        ({"token_ids": [[101]], "inputs": ["a"]}, "exactly one of inputs and token_ids"),
        ({"token_ids": [[101, 102]], "prompt_name": "query"}, "prompt_name applies to text"),
    ],
)
def test_bad_pre_tokenized_embed_is_invalid_argument(
    kw: dict[str, Any], expected: str, client: ModelCacheClient
) -> None:
    inputs = kw.pop("inputs", None)
    with pytest.raises(ModelCacheError) as info:
        client.embed("e5", inputs, **kw)
    assert info.value.code is Code.INVALID_ARGUMENT
    assert expected in info.value.details


# -- the YAML against the modules ----------------------------------------------------
def _prepare(path: Path, **kw: Any) -> Any:
    config = parse_config({"models": [model("m", path, "embedding", **kw)]})
    return prepare_model(config.models[0], config)


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"pooling": "mean"}, "pooling: mean (the checkpoint pools cls)"),
        ({"normalize": False}, "normalize: false (the checkpoint has a Normalize)"),
    ],
)
def test_a_contradicting_setting_fails_the_load_with_the_reason(
    kw: dict[str, Any], expected: str, checkpoints: dict[str, Path]
) -> None:
    with pytest.raises(ModelLoadError) as info:
        _prepare(checkpoints["bge"], **kw)
    assert info.value.error_class == "bad_config"
    assert expected in info.value.message
    assert "override_sentence_transformers: true" in info.value.message


def test_agreeing_settings_load(checkpoints: dict[str, Path]) -> None:
    prepared = _prepare(checkpoints["bge"], pooling="cls", normalize=True)
    assert prepared.recipe.pooling == ("cls",) and prepared.recipe.normalize


def test_the_override_flag_serves_the_configured_pooling(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    path = checkpoints["bge"]
    config = parse_config(
        {
            "models": [
                model(
                    "m",
                    path,
                    "embedding",
                    pooling="mean",
                    normalize=False,
                    override_sentence_transformers=True,
                )
            ]
        }
    )
    registry = ModelRegistry(config)
    registry.prepare()
    registry.load_all()
    try:
        entry = registry.entry("m")
        assert entry.state is ModelState.READY, entry.error
        running = RunningDaemon(config, registry)
        try:
            with ModelCacheClient(running.address, timeout=60) as c:
                got = c.embed("m", TEXTS)
        finally:
            running.stop()
    finally:
        registry.close()
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    body = transformers.AutoModel.from_pretrained(str(path)).eval()
    for row, text in zip(got, TEXTS, strict=True):
        with torch.no_grad():
            hidden = body(**tok(text, return_tensors="pt")).last_hidden_state[0]
        np.testing.assert_allclose(row, hidden.mean(0).numpy(), atol=1e-5)


def test_without_modules_the_yaml_decides_as_before(tmp_path: Path) -> None:
    path = tiny_models.bert(tmp_path / "bert")
    assert _prepare(path).recipe.pooling == ("mean",) and _prepare(path).recipe.normalize
    prepared = _prepare(path, pooling="cls", normalize=False)
    assert (prepared.recipe.pooling, prepared.recipe.normalize) == (("cls",), False)
    assert prepared.recipe.source == "config"


# -- what cannot be served faithfully is refused --------------------------------------
def _edit(src: Path, dest: Path, rel: str, change: dict[str, Any]) -> Path:
    import shutil

    shutil.copytree(src, dest)
    f = dest / rel
    f.write_text(json.dumps({**json.loads(f.read_text()), **change}))
    return dest


@pytest.mark.parametrize(
    ("rel", "change", "expected"),
    [
        ("2_Dense/config.json", {"out_features": 25}, "do not match the config's"),
        ("2_Dense/config.json", {"in_features": 32}, "do not follow the 64-wide input"),
        (
            "2_Dense/config.json",
            {"activation_function": "evil.module.Run"},
            "activation_function 'evil.module.Run'",
        ),
        ("1_Pooling/config.json", {"pooling_mode": "sum"}, "pooling_mode 'sum'"),
        ("1_Pooling/config.json", {"include_prompt": False}, "include_prompt false"),
        ("config_sentence_transformers.json", {"default_prompt_name": "q"}, "'q' is not among"),
    ],
)
def test_modules_that_cannot_be_served_faithfully_fail_the_load(
    rel: str, change: dict[str, Any], expected: str, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    path = _edit(checkpoints["wmean-dense"], tmp_path / "m", rel, change)
    with pytest.raises(ModelLoadError) as info:
        _prepare(path)
    assert expected in info.value.message


def test_pickle_dense_weights_are_never_loaded(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    path = _edit(checkpoints["wmean-dense"], tmp_path / "m", "2_Dense/config.json", {})
    (path / "2_Dense" / "model.safetensors").rename(path / "2_Dense" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle weights are never loaded"):
        _prepare(path)


def test_an_unknown_module_fails_the_load(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    path = tmp_path / "m"
    shutil.copytree(checkpoints["bge"], path)
    modules = json.loads((path / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "", "type": "x.LayerNorm"})
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match=r"module 2 \(LayerNorm\) .* is not supported"):
        _prepare(path)


# -- ListModels never fails because of one model ------------------------------------
def test_list_models_reports_a_bad_value_in_that_models_entry(
    served: RunningDaemon, client: ModelCacheClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load_failures count past uint32 fails protobuf at construction, a lone surrogate
    (an undecodable file name in an error) only when gRPC serializes the response: each
    must cost that model's entry, not ListModels for every model."""
    registry = served.registry
    real = registry.entries

    def entries() -> list[Any]:
        out = []
        for e in real():
            if e.spec.name == "bge":
                e = dataclasses.replace(e, failures=-1)
            elif e.spec.name == "max":
                e = dataclasses.replace(e, error="cannot read /models/\udcff/config.json")
            out.append(e)
        return out

    monkeypatch.setattr(registry, "entries", entries)
    info = {m.name: m for m in client.list_models().models}
    assert set(info) == {"bge", "e5", "qwen3", "max", "wmean-dense", "gemma", "minilm"}
    for name in ("bge", "max"):
        assert info[name].error_class == "status", info[name]
        assert "this model's status cannot be reported" in info[name].error
        assert info[name].state == "ready" and info[name].task == "embedding"
    assert "\\udcff" in info["max"].error
    assert info["e5"].error_class == "" and info["e5"].fingerprint


def test_do_lower_case_lowercases_as_sentence_transformers_does(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """A legacy sentence_bert_config.json with do_lower_case over a cased tokenizer: the
    text is lowercased before tokenizing, as sentence-transformers does on load."""
    path = _edit(checkpoints["bge"], tmp_path / "m", "sentence_bert_config.json", {})
    tok = json.loads((path / "tokenizer.json").read_text())
    tok["normalizer"]["lowercase"] = False
    (path / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "do_lower_case": False}))
    texts = ["HELLO World", "Serving Embeddings EXACTLY"]
    cased = ModelCompute(load_model(_prepare(path))).tokenize(texts, True)
    st_cfg = json.loads((path / "sentence_bert_config.json").read_text())
    st_cfg["do_lower_case"] = True
    (path / "sentence_bert_config.json").write_text(json.dumps(st_cfg))
    compute = ModelCompute(load_model(_prepare(path)))
    ids = compute.tokenize(texts, True)
    assert ids == compute.tokenize([t.lower() for t in texts], True) and ids != cased
    with torch.inference_mode():
        got = compute.embed([EmbedItem(s, compute.recipe.normalize) for s in ids])
    want = _reference(path, texts)
    assert _cos(got, want).min() >= 0.9999
