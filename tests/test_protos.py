"""The checked-in generated code is what hack/gen-protos.sh makes from the .proto today."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "modelcache" / "v1"
# The generator's venv is built from a real python3.11 (not this test venv's interpreter).
_ENV = {
    "PATH": f"{Path(sys.base_prefix) / 'bin'}:/usr/bin:/bin",
    "HOME": str(Path.home()),
    **{k: v for k, v in os.environ.items() if k.startswith(("PIP_", "MODELCACHE_"))},
}


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "hack" / "gen-protos.sh"), str(tmp_path)],
        check=True,
        cwd=ROOT,
        env=_ENV,
        capture_output=True,
        timeout=300,
    )
    fresh = tmp_path / "modelcache" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.suffix in (".py", ".pyi"))
    assert names == [
        "__init__.py",
        "modelcache_pb2.py",
        "modelcache_pb2.pyi",
        "modelcache_pb2_grpc.py",
    ]
    stale = [
        n
        for n in names
        if n != "__init__.py" and (fresh / n).read_bytes() != (GENERATED / n).read_bytes()
    ]
    assert not stale, f"{stale} differ from protos/: run `make protos` and commit the result"


def test_the_check_notices_a_change(tmp_path: Path) -> None:
    """Guard against a comparison that can never fail: a changed proto gives other code."""
    protos = tmp_path / "protos" / "modelcache" / "v1"
    protos.mkdir(parents=True)
    source = (ROOT / "protos" / "modelcache" / "v1" / "modelcache.proto").read_text()
    (protos / "modelcache.proto").write_text(
        source.replace("uint32 top_k = 4;", "uint32 top_k = 4;\n  bool x = 99;")
    )
    subprocess.run(
        ["bash", str(ROOT / "hack" / "gen-protos.sh"), str(tmp_path)],
        check=True,
        cwd=ROOT,
        env={**_ENV, "PROTO_ROOT": str(tmp_path / "protos")},
        capture_output=True,
        timeout=300,
    )
    changed = (tmp_path / "modelcache" / "v1" / "modelcache_pb2.py").read_bytes()
    assert changed != (GENERATED / "modelcache_pb2.py").read_bytes()
