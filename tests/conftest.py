"""Shared test set-up: offline by construction, and small thread pools on a 2-core box."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import yaml

from modelcache.config import DaemonConfig, parse_config


@pytest.fixture
def make_config(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Build a DaemonConfig from model dicts (defaults: cpu, float32) and write it to disk."""

    def _make(*models: dict, **extra: object) -> DaemonConfig:
        data = {"models": list(models), **extra}
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
        return parse_config(data)

    return _make
