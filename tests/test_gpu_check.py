"""bench/gpu_check.py in its CPU mode (issue 12), so the GPU check never rots: every
section is produced and correctness and the OOM split pass on small shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_small(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench/gpu_check.py"),
            "--device",
            "cpu",
            "--small",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"load", "correctness", "serving", "oom"} <= set(report)
    models = {"llama-8b", "llama-1b", "gpt2", "minilm"}
    assert set(report["load"]) == set(report["correctness"]) == models
    for name, c in report["correctness"].items():
        assert c["passed"] and c["max_abs_delta"] <= 1e-4, (name, c)
    for name, figures in report["load"].items():
        assert figures["bytes"] > 0 and figures["gb_per_s"] > 0, (name, figures)
    assert report["correctness"]["llama-8b"]["split_head"]
    assert all(s["served_tokens_per_s"] > 0 for s in report["serving"].values())
    oom = report["oom"]["llama-1b"]
    assert oom["passed"] and oom["splits"] >= 1 and oom["answered"]
    assert report["passed"]
