"""The client alone, in a training pod's environment: a compatibility matrix.

Each row is a fresh virtual environment from one of the Pythons this machine has (pyenv),
with the grpcio, protobuf and numpy a training image would already hold, into which the
project is installed with no extras, as `pip install <repo>` does in a pod. Checks: nothing
heavy came along, the pod's own versions were kept, importing ``modelcache.client`` imports
no torch or transformers, and every call of both clients works against a real daemon and
returns what the project's own client gets.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiny_models
from daemon_process import ServeProcess

from modelcache.client import ModelCacheClient
from modelcache.examples import bundled_minilm

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a training pod asks", "for embeddings and log-probs"]
#: (Python, what the training image holds already; empty: let pip take current releases)
MATRIX = [
    (
        "3.10",
        ["grpcio==1.62.3", "grpcio-health-checking==1.62.3", "protobuf==5.26.1", "numpy==1.26.4"],
    ),
    ("3.13", []),
]
HEAVY = {
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "huggingface-hub",
    "pydantic",
    "pydantic-settings",
    "kopf",
    "kubernetes",
    "prometheus-client",
    "pyyaml",
    "grpcio-reflection",
    "tqdm",
}
CLIENT_SCRIPT = r"""
import asyncio, json, sys
from modelcache.client import AsyncModelCacheClient, ModelCacheClient, RetryPolicy
heavy = [m for m in ("torch", "transformers", "pydantic", "yaml") if m in sys.modules]
address, texts = sys.argv[1], json.loads(sys.argv[2])
with ModelCacheClient(address, timeout=30, retry=RetryPolicy(max_attempts=3)) as c:
    c.wait_until_serving("", timeout=60)
    emb = c.embed("minilm", texts)
    lps = c.logprobs("gpt2", texts, top_k=3, entropy=True, expected_logprob=True, rank=True)
    models = c.list_models()
    out = {
        "heavy": heavy,
        "embed": emb.tolist(),
        "logprobs": [s.logprobs.tolist() for s in lps],
        "entropy": [s.entropy.tolist() for s in lps],
        "top_k_ids": [s.top_k_ids.tolist() for s in lps],
        "models": sorted(m.name for m in models.models),
        "health": c.health("minilm"),
    }
    try:
        c.embed("gpt2", texts)
    except Exception as exc:
        out["wrong_task"] = [type(exc).__name__, exc.code.name]

async def aio():
    async with AsyncModelCacheClient(address, timeout=30) as a:
        return (await a.embed("minilm", texts)).tolist()

out["aio_embed"] = asyncio.run(aio())
import google.protobuf, grpc, numpy
out["versions"] = {"grpc": grpc.__version__, "protobuf": google.protobuf.__version__,
                   "numpy": numpy.__version__, "python": sys.version.split()[0]}
print(json.dumps(out))
"""


def _python(version: str) -> str:
    """pyenv's interpreter itself (its shims only run the versions selected as global)."""
    pyenv = sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"))
    if pyenv:
        return str(pyenv[-1])
    found = shutil.which(f"python{version}")
    if found and "/shims/" not in found:
        return found
    pytest.fail(f"no python{version} on this machine (pyenv ships 3.9-3.13 here)", pytrace=False)


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a copy of what it packages (the checkout holds a
    virtual environment that must not be walked or written into)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "modelcache", src / "modelcache", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(out)])
    (whl,) = out.glob("modelcache-*.whl")
    return whl


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("compat-daemon")
    gpt2 = tiny_models.gpt2(root / "gpt2")
    config = {
        "models": [
            {"name": "minilm", "source": str(bundled_minilm()), "task": "embedding"},
            {"name": "gpt2", "source": str(gpt2), "task": "causal-lm"},
        ]
    }
    with ServeProcess(config, root) as proc:
        proc.wait_settled()
        yield proc


@pytest.mark.parametrize(("version", "held"), MATRIX, ids=[f"py{v}" for v, _ in MATRIX])
def test_the_client_alone_in_a_training_pods_environment(
    version: str, held: list[str], wheel: Path, daemon: ServeProcess, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    _run([_python(version), "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    if held:
        _run([*pip, "install", "-q", *held])
    _run([*pip, "install", "-q", str(wheel)])
    installed = {
        d["name"].lower().replace("_", "-"): d["version"]
        for d in json.loads(_run([*pip, "list", "--format=json"]).stdout)
    }
    assert not HEAVY & installed.keys(), sorted(HEAVY & installed.keys())
    for pin in held:  # the pod's own versions stay
        name, _, wanted = pin.partition("==")
        assert installed[name] == wanted, (name, installed[name])
    out = json.loads(
        _run(
            [str(venv / "bin" / "python"), "-c", CLIENT_SCRIPT, daemon.address, json.dumps(TEXTS)]
        ).stdout
    )
    assert out["heavy"] == [], "importing modelcache.client imported heavy packages"
    assert out["versions"]["python"].startswith(version)
    with ModelCacheClient(daemon.address) as ours:
        want = ours.embed("minilm", TEXTS)
        lps = ours.logprobs("gpt2", TEXTS, top_k=3, entropy=True, expected_logprob=True)
    assert out["embed"] == want.tolist() and out["aio_embed"] == want.tolist()
    assert out["logprobs"] == [s.logprobs.tolist() for s in lps]
    assert out["entropy"] == [s.entropy.tolist() for s in lps]
    assert out["models"] == ["gpt2", "minilm"] and out["health"] == "SERVING"
    assert out["wrong_task"] == ["ModelCacheError", "FAILED_PRECONDITION"]
