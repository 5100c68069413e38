"""bench/gpu_check.py in its CPU mode (issue 12), so the GPU check never rots: every
section is produced and correctness and the OOM split pass on small shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


def _carried() -> dict[str, str]:
    out = {}
    for line in (REPO / "bench/gpu_wheels.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            out[canonicalize_name(name)] = version.strip()
    return out


#: What the GPU machine's image already holds that the carried wheels may depend on
#: (/work/.library/device/KINDS.md: numpy 2.5, torch 2.11, and these, with floors years
#: old in every carried wheel's metadata).
IMAGE = {"numpy", "packaging", "tqdm", "typer", "filelock", "fsspec", "torch"}


def test_carried_wheels_are_the_project_pins() -> None:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split(";")[0].split("==")
            pins[canonicalize_name(name)] = version.strip()
    carried = _carried()
    assert {n: pins.get(n) for n in carried} == carried


def test_carried_wheels_are_closed_under_dependencies() -> None:
    """A carried package whose dependency the GPU image lacks fails at import there, a
    device call (minutes of a scarce budget) too late: huggingface_hub 2 needs httpx2."""
    carried = _carried()
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "extra": ""}
    missing = set()
    for name in carried:
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            dep = canonicalize_name(req.name)
            if dep not in carried and dep not in IMAGE:
                missing.add(f"{name} -> {text}")
    assert not missing
