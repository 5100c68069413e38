"""`modelcache download`: atomic, verified, idempotent; the daemon loads what it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models
from loader_helpers import load_one

from modelcache.daemon.download import MANIFEST, download
from modelcache.daemon.errors import ModelLoadError
from modelcache.daemon.registry import ModelState


def test_local_directory_is_copied_with_a_manifest(tmp_path: Path) -> None:
    src = tiny_models.gpt2(tmp_path / "src" / "gpt2")
    dest = download(str(src), tmp_path / "volume")
    assert dest == tmp_path / "volume" / "gpt2"
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["revision"].startswith("local-")
    size = (src / "model.safetensors").stat().st_size
    assert manifest["files"]["model.safetensors"]["size"] == size
    assert not [p for p in (tmp_path / "volume").iterdir() if p.name.startswith(".")]
    entry = load_one(dest, "causal-lm")
    assert entry.state is ModelState.READY
    assert entry.loaded is not None and entry.loaded.revision == manifest["revision"]


def test_second_download_is_a_verified_no_op(tmp_path: Path) -> None:
    src = tiny_models.bert(tmp_path / "bert")
    dest = download(str(src), tmp_path / "volume")
    inode = (dest / "model.safetensors").stat().st_ino
    assert download(str(src), tmp_path / "volume") == dest
    assert (dest / "model.safetensors").stat().st_ino == inode


def test_a_damaged_copy_is_reported_and_never_replaced(tmp_path: Path) -> None:
    """A checkpoint in place may be read by a daemon (a shared volume): it is checked
    against its manifest, by sizes (it was hashed when written) or, with verify, by sha256,
    and a mismatch is an error for a person to act on, never an rmtree under a reader."""
    src = tiny_models.bert(tmp_path / "bert")
    dest = download(str(src), tmp_path / "volume")
    with (dest / "model.safetensors").open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    assert download(str(src), tmp_path / "volume") == dest  # same sizes: not re-hashed
    with pytest.raises(ModelLoadError, match="does not match its manifest"):
        download(str(src), tmp_path / "volume", verify=True)
    with (dest / "model.safetensors").open("ab") as f:
        f.write(b"tail")
    with pytest.raises(ModelLoadError, match="remove it to download again"):
        download(str(src), tmp_path / "volume")
    assert (dest / "model.safetensors").exists()  # still there for its readers
    assert sorted(p.name for p in (tmp_path / "volume").iterdir()) == ["bert"]


def test_hub_id_needs_a_revision(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="needs --revision"):
        download("org/not-a-local-dir", tmp_path)


def test_cli_download_prints_the_destination(tmp_path: Path) -> None:
    src = tiny_models.bert(tmp_path / "bert")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelcache.cli",
            "download",
            str(src),
            "--to",
            str(tmp_path / "vol"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "vol" / "bert")
