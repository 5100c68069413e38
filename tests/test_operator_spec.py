"""The ModelCache resource without a cluster: the CRD file kept in step with the pydantic
models (and through them with the daemon's config), and the checks the schema cannot do."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelcache.config import (
    DEVICE_PATTERN,
    MODEL_NAME_PATTERN,
    REVISION_PATTERN,
    BatchingConfig,
    ModelSpec,
)
from modelcache.operator.aggregate import ModelStatus
from modelcache.operator.spec import (
    API_VERSION,
    IMAGE_PATTERN,
    KIND,
    QUANTITY_PATTERN,
    ModelCacheSpec,
    SpecError,
    parse_spec,
)
from modelcache.operator.status import CacheStatus, Condition

ROOT = Path(__file__).resolve().parents[1]
FILES = ROOT / "deploy" / "helm" / "modelcache" / "files"
SHA = "0123456789abcdef0123456789abcdef01234567"


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load((FILES / "crd-modelcaches.yaml").read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def spec_dict(**extra: Any) -> dict[str, Any]:
    return {
        "image": "registry.example/modelcache:0.1.0",
        "models": [
            {"name": "minilm", "source": "org/minilm", "revision": SHA, "task": "embedding"},
            {"name": "local.one", "source": "tiny", "task": "causal-lm"},
        ],
        **extra,
    }


def spec(**extra: Any) -> ModelCacheSpec:
    return parse_spec("cache", spec_dict(**extra))


# --- the CRD file and the pydantic models describe the same resource --------------------
def test_crd_models_items_mirror_the_daemon_model_spec() -> None:
    items = crd_schema()["properties"]["spec"]["properties"]["models"]["items"]
    props = items["properties"]
    assert set(props) == set(ModelSpec.model_fields)
    assert props["name"]["pattern"] == MODEL_NAME_PATTERN
    assert props["revision"]["pattern"] == REVISION_PATTERN
    assert props["device"]["pattern"] == DEVICE_PATTERN
    for field in ("task", "dtype", "pooling"):
        literal = ModelSpec.model_fields[field].annotation
        # pooling is optional (unset: the checkpoint's modules decide): its Literal is inside.
        args = typing.get_args(literal)
        literals = [a for a in args if typing.get_origin(a) is typing.Literal]
        values = list(typing.get_args(literals[0])) if literals else list(args)
        assert props[field]["enum"] == values, field
    for field, info in ModelSpec.model_fields.items():
        if "default" in props[field]:
            assert props[field]["default"] == info.default, field
    assert set(items["required"]) == {
        n for n, f in ModelSpec.model_fields.items() if f.is_required()
    }


def test_crd_batching_mirrors_the_daemon_batching_config() -> None:
    props = crd_schema()["properties"]["spec"]["properties"]["batching"]["properties"]
    assert set(props) == set(BatchingConfig.model_fields)
    for name, info in BatchingConfig.model_fields.items():
        assert props[name]["default"] == info.default, name
        bounds = {type(m).__name__: m for m in info.metadata}
        if "Ge" in bounds:
            assert props[name]["minimum"] == bounds["Ge"].ge, name
        if "Le" in bounds:
            assert props[name]["maximum"] == bounds["Le"].le, name


def test_crd_spec_and_status_mirror_the_operator_models() -> None:
    schema = crd_schema()
    spec_props = schema["properties"]["spec"]["properties"]
    assert set(spec_props) == {f.alias for f in ModelCacheSpec.model_fields.values()}
    assert spec_props["image"]["pattern"] == IMAGE_PATTERN
    assert (
        spec_props["storage"]["properties"]["pvc"]["properties"]["size"]["pattern"]
        == QUANTITY_PATTERN
    )
    status = schema["properties"]["status"]["properties"]
    assert set(status) == {f.alias for f in CacheStatus.model_fields.values()}
    assert set(status["models"]["items"]["properties"]) == {
        f.alias for f in ModelStatus.model_fields.values()
    }
    assert set(status["conditions"]["items"]["properties"]) == {
        f.alias for f in Condition.model_fields.values()
    }


def _walk(node: dict[str, Any], path: str) -> list[str]:
    """Paths of schema nodes that are not structural (no type, and no escape hatch)."""
    bad = []
    if not (
        {"type", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields"} & set(node)
    ):
        bad.append(path)
    for name, child in (node.get("properties") or {}).items():
        bad += _walk(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            bad += _walk(node[key], f"{path}[{key}]")
    return bad


def test_crd_schema_is_structural_with_printer_columns() -> None:
    assert _walk(crd_schema(), "") == []
    crd = yaml.safe_load((FILES / "crd-modelcaches.yaml").read_text())
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == ".status.readyModels"
    assert columns["Replicas"] == ".status.replicaStatus"
    assert columns["Phase"] == ".status.phase"
    assert columns["Age"] == ".metadata.creationTimestamp"
    assert crd["spec"]["names"]["shortNames"] == ["mc"]


def test_example_resource_is_a_valid_spec() -> None:
    example = yaml.safe_load((ROOT / "examples" / "modelcache-minilm.yaml").read_text())
    parsed = parse_spec(example["metadata"]["name"], example["spec"])
    assert parsed.models[0].is_hub_id and parsed.storage.pvc is not None


# --- deeper checks: what the schema cannot say, said clearly --------------------------
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {
                "models": [
                    {"name": "a", "source": "x", "task": "embedding"},
                    {"name": "a", "source": "y", "task": "embedding"},
                ]
            },
            "spec.models[1].name 'a' repeats models[0].name",
        ),
        (
            {"models": [{"name": "a", "source": "x", "task": "embedding", "device": "cuda"}]},
            "set resources.limits['nvidia.com/gpu'] to at least 1",
        ),
        (
            {
                "models": [{"name": "a", "source": "x", "task": "embedding", "device": "cuda:1"}],
                "resources": {"limits": {"nvidia.com/gpu": 1}},
            },
            "at least 2",
        ),
        ({"image": "registry.example/modelcache:latest"}, "moving tag 'latest'"),
        ({"ports": {"grpc": 9000, "metrics": 9000}}, "ports.grpc and ports.metrics are both 9000"),
        (
            {"models": [{"name": "a", "source": "org/x", "task": "embedding"}]},
            "spec.models[0]: source 'org/x' is a hub id, so 'revision' must pin it",
        ),
        (
            {"models": [{"name": "a", "source": "x", "task": "embedding", "allow_missing": ["("]}]},
            "spec.models[0].allow_missing",
        ),
        (
            {"storage": {"pvc": {"size": "1Gi"}, "hostPath": {"path": "/x"}}},
            "set exactly one of pvc, existingClaim, hostPath, emptyDir",
        ),
    ],
)
def test_deeper_checks_say_what_to_fix(change: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec("cache", {**spec_dict(), **change})
    assert expected in str(info.value)


def test_bad_name_is_reported_with_the_spec_problems() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec("Cache_1", {**spec_dict(), "image": "x:latest"})
    assert "metadata.name 'Cache_1'" in str(info.value)
    assert "latest" in str(info.value)


def test_devices_default_to_the_gpu_when_the_pod_gets_one() -> None:
    assert {m.device for m in spec().models} == {"cpu"}
    gpu = spec(resources={"limits": {"nvidia.com/gpu": 1}})
    assert {m.device for m in gpu.models} == {"cuda"}
    pinned = parse_spec(
        "cache",
        {
            **spec_dict(resources={"limits": {"nvidia.com/gpu": "2"}}),
            "models": [{"name": "a", "source": "x", "task": "embedding", "device": "cuda:1"}],
        },
    )
    assert pinned.models[0].device == "cuda:1"


def test_chart_defaults_fill_only_what_a_spec_leaves_out() -> None:
    from modelcache.operator.spec import with_defaults

    defaults = {
        "image": "registry.example/modelcache:0.2.0",
        "priorityClassName": "ml",
        "tolerations": [{"key": "gpu", "operator": "Exists"}],
        "storageClassName": "fast",
    }
    spec = {
        "models": [{"name": "m", "source": "m", "task": "embedding"}],
        "priorityClassName": "mine",
        "storage": {"pvc": {"size": "1Gi"}},
    }
    merged = parse_spec("cache", with_defaults(spec, defaults))
    assert merged.image == "registry.example/modelcache:0.2.0"
    assert merged.priority_class_name == "mine"  # the spec's own value wins
    assert merged.tolerations[0].key == "gpu"
    assert merged.storage.pvc is not None and merged.storage.pvc.storage_class_name == "fast"
    with pytest.raises(SpecError, match=r"no image: set spec\.image"):
        parse_spec("cache", spec)


def test_the_hpa_example_targets_the_modelcache_scale_subresource() -> None:
    hpa = yaml.safe_load((ROOT / "examples" / "hpa-modelcache.yaml").read_text())
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == (API_VERSION, KIND)
    crd = yaml.safe_load((FILES / "crd-modelcaches.yaml").read_text())
    assert crd["spec"]["versions"][0]["subresources"]["scale"]["specReplicasPath"] == (
        ".spec.replicas"
    )
