"""`modelcache preload`: a table (or JSON) of every model, non-zero exit when one failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import tiny_models
import yaml

from modelcache.examples import bundled_minilm


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelcache.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_preload_table_and_json(tmp_path: Path) -> None:
    broken = tiny_models.gpt2(tmp_path / "broken")
    os.truncate(broken / "model.safetensors", 64)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {"name": "minilm", "source": str(bundled_minilm()), "task": "embedding"},
                    {"name": "broken", "source": str(broken), "task": "causal-lm"},
                ]
            }
        )
    )
    proc = run("preload", "--config", str(cfg))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "TASK", "DEVICE", "DTYPE"]
    minilm = next(line for line in lines if line.startswith("minilm"))
    assert "ready" in minilm and "read=" in minilm and "total=" in minilm
    assert "broken failed (corrupt_weights)" in proc.stderr

    proc = run("preload", "--config", str(cfg), "--json")
    doc = json.loads(proc.stdout)
    by_name = {m["name"]: m for m in doc["models"]}
    assert by_name["minilm"]["status"] == "ready" and len(by_name["minilm"]["fingerprint"]) == 64
    assert by_name["minilm"]["bytes"] > 80_000_000
    assert by_name["broken"]["status"] == "failed"
    assert doc["versions"]["transformers"] == "5.23.0"


def test_preload_all_ready_exits_zero(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {
                        "name": "bert",
                        "source": str(tiny_models.bert(tmp_path / "b")),
                        "task": "embedding",
                    }
                ]
            }
        )
    )
    assert run("preload", "--config", str(cfg)).returncode == 0


def test_bad_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models:\n  - {name: m, source: /x, task: translate}\n")
    proc = run("preload", "--config", str(cfg))
    assert proc.returncode == 2 and "models.0.task" in proc.stderr
