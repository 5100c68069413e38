from __future__ import annotations

from pathlib import Path

import pytest

from modelcache.config import ConfigError, load_config, parse_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    text = "models:\n  - {name: m, source: /models/m, task: embedding}\n"
    cfg = load_config(write(tmp_path, text))
    m = cfg.models[0]
    # pooling and normalize unset: the checkpoint's sentence-transformers modules decide
    # (mean and true without them, see test_st_modules).
    assert (m.dtype, m.device, m.pooling, m.normalize, m.max_length) == (
        "auto",
        "cpu",
        None,
        None,
        512,
    )
    assert m.allow_missing == () and m.trust_remote_code is False
    assert m.override_sentence_transformers is False


def test_bad_yaml_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "models: [\n  - name: x\n"))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read configuration .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("model", "field"),
    [
        ({"name": "m", "source": "/m", "task": "summarize"}, "models.0.task"),
        ({"name": "m", "source": "/m", "task": "embedding", "dtype": "float64"}, "models.0.dtype"),
        ({"name": "m", "source": "/m", "task": "embedding", "device": "gpu"}, "models.0.device"),
        ({"name": "m", "source": "/m", "task": "embedding", "pooling": "sum"}, "models.0.pooling"),
        (
            {"name": "m", "source": "/m", "task": "embedding", "max_length": 0},
            "models.0.max_length",
        ),
        ({"name": "Bad Name", "source": "/m", "task": "embedding"}, "models.0.name"),
        (
            {"name": "m", "source": "/m", "task": "embedding", "allow_missing": ["("]},
            "models.0.allow_missing",
        ),
        ({"name": "m", "source": "/m", "task": "embedding", "colour": "red"}, "models.0.colour"),
        ({"name": "m", "source": "org/model", "task": "embedding"}, "models.0"),
        (
            {"name": "m", "source": "org/model", "revision": "main", "task": "embedding"},
            "models.0.revision",
        ),
    ],
)
def test_invalid_fields_are_named(model: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"models": [model]})
    assert f"  {field}" in str(info.value), str(info.value)


def test_hub_id_needs_a_commit_sha() -> None:
    with pytest.raises(ConfigError, match="commit sha"):
        parse_config({"models": [{"name": "m", "source": "gpt2/small", "task": "causal-lm"}]})
    cfg = parse_config(
        {
            "models": [
                {"name": "m", "source": "openai/gpt2", "task": "causal-lm", "revision": "a" * 40}
            ]
        }
    )
    assert cfg.models[0].is_hub_id


def test_duplicate_names_rejected() -> None:
    m = {"name": "m", "source": "/m", "task": "embedding"}
    with pytest.raises(ConfigError, match="duplicate model name 'm'"):
        parse_config({"models": [m, m]})


def test_empty_and_non_mapping_documents(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="models"):
        parse_config({"models": []})
