"""The daemon's exposition after real loads (one good, one failed) passes
`promtool check metrics` (Debian package prometheus; hack/system-deps.sh installs it)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import tiny_models
from loader_helpers import spec
from prometheus_client import generate_latest

from modelcache.config import parse_config
from modelcache.daemon.loader import record_build_info
from modelcache.daemon.registry import ModelRegistry
from modelcache.metrics import DAEMON_REGISTRY


def test_load_metrics_pass_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run `bash hack/system-deps.sh` (Debian package prometheus)"
    broken = tiny_models.gpt2(tmp_path / "broken")
    os.truncate(broken / "model.safetensors", 10)
    r = ModelRegistry(
        parse_config(
            {
                "models": [
                    spec("expo-good", tiny_models.bert(tmp_path / "good"), "embedding"),
                    spec("expo-broken", broken, "causal-lm"),
                ]
            }
        )
    )
    r.prepare()
    r.load_all()
    r.close()
    record_build_info()
    text = generate_latest(DAEMON_REGISTRY)
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    body = text.decode()
    for line in (
        'modelcache_model_load_seconds_count{model="expo-good",stage="total"} 1.0',
        'modelcache_model_loads_total{model="expo-good",outcome="success"} 1.0',
        'modelcache_model_loads_total{model="expo-broken",outcome="corrupt_weights"} 1.0',
        'modelcache_model_loaded{model="expo-good"} 1.0',
        'modelcache_model_loaded{model="expo-broken"} 0.0',
    ):
        assert line in body, line
    for stage in ("resolve", "read", "materialize", "verify", "warmup"):
        assert f'modelcache_model_load_seconds_count{{model="expo-good",stage="{stage}"}}' in body
    assert 'modelcache_model_weight_bytes{device="cpu",model="expo-good"}' in body
