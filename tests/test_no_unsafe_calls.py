"""Untrusted input never reaches a shell, an unpickler or an evaluator: the product code
contains no such call at all (checked on the AST, so a `noqa` cannot hide one)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "modelcache"
FORBIDDEN_CALLS = {
    "eval",
    "exec",
    "compile",
    "os.system",
    "os.popen",
    "pickle.load",
    "pickle.loads",
    "torch.load",
    "marshal.loads",
    "yaml.load",
    "yaml.unsafe_load",
    "subprocess.getoutput",
    "subprocess.getstatusoutput",
}


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def _sources() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if "/v1/" not in p.as_posix()]


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_calls(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _name(node.func)
            if name in FORBIDDEN_CALLS:
                bad.append(f"{path.name}:{node.lineno} {name}()")
            for kw in node.keywords:
                if kw.arg == "shell" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    bad.append(f"{path.name}:{node.lineno} {name}(shell=...)")
        if isinstance(node, ast.ImportFrom) and node.module in {"pickle", "marshal"}:
            bad.append(f"{path.name}:{node.lineno} from {node.module} import ...")
    assert not bad, bad


def test_the_scan_finds_what_it_looks_for(tmp_path: Path) -> None:
    tree = ast.parse("import os, subprocess\nos.system('x')\nsubprocess.run('x', shell=True)\n")
    calls = [_name(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert "os.system" in calls and "subprocess.run" in calls
