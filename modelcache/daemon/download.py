"""``modelcache download``: put a model on the model volume, verified, atomically.

The daemon never downloads (HF_HUB_OFFLINE=1); the pod's ``fetch`` container (fetch.py)
runs this for every hub model of the configuration, at start and whenever it changes. Files
land in a temporary directory on the same filesystem, are checked (size and sha256 against
the hub's metadata, or against the source for a local directory), described in
``.modelcache-manifest.json``, and only then renamed into place — a daemon never sees a
partial or half-rewritten checkpoint.

A checkpoint already in place is checked against its manifest by file sizes only (it was
hashed when it was written; ``verify=True`` hashes it again), and it is never replaced or
removed: on a shared volume another pod may be reading it. One that fails the check is
reported, for a person to remove.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from modelcache.daemon.errors import ModelLoadError
from modelcache.daemon.resolve import hub_dir

MANIFEST = ".modelcache-manifest.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.py"]


def sha256_file(path: Path, bar: tqdm | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return h.hexdigest()


def _manifest(root: Path, source: str, revision: str | None) -> dict[str, Any]:
    files = {}
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", leave=False) as bar:
        for p in paths:
            rel = p.relative_to(root).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p, bar)}
    if revision is None:
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        revision = "local-" + digest[:16]
    return {"source": source, "revision": revision, "files": files}


def _install(tmp: Path, dest: Path) -> None:
    """Move a fully written and verified directory into place; if another writer (a replica
    sharing the volume) got there first, keep theirs: never rename over a directory that a
    daemon may be reading."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, dest)
    except OSError:
        if not dest.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def existing_ok(dest: Path, verify: bool = False) -> bool:
    """``dest`` holds what its manifest lists: the same files with the same sizes (and, with
    ``verify``, the same sha256)."""
    manifest = dest / MANIFEST
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())
    except ValueError:
        return False
    files = recorded.get("files")
    if not isinstance(files, dict):
        return False
    if verify:
        fresh = _manifest(dest, recorded.get("source", ""), recorded.get("revision"))
        return bool(fresh["files"] == files)
    present = {
        p.relative_to(dest).as_posix(): p.stat().st_size
        for p in dest.rglob("*")
        if p.is_file() and p.name != MANIFEST
    }
    return present == {name: f.get("size") for name, f in files.items()}


def _copy_local(source: Path, tmp: Path) -> None:
    paths = sorted(p for p in source.rglob("*") if p.is_file() and p.name != MANIFEST)
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"copy {source.name}") as bar:
        for p in paths:
            target = tmp / p.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            with p.open("rb") as src, target.open("wb") as dst:
                while chunk := src.read(8 * 1024 * 1024):
                    dst.write(chunk)
                    bar.update(len(chunk))
                dst.flush()
                os.fsync(dst.fileno())


def _fetch_hub(repo_id: str, revision: str, tmp: Path) -> None:
    """Download from the hub and check every file against the hub's own size/sha256."""
    from huggingface_hub import HfApi, snapshot_download

    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    snapshot_download(repo_id, revision=revision, local_dir=str(tmp), allow_patterns=HUB_PATTERNS)
    shutil.rmtree(tmp / ".cache", ignore_errors=True)
    for sibling in info.siblings or []:
        path = tmp / sibling.rfilename
        if not path.is_file():
            continue  # filtered out by HUB_PATTERNS
        if sibling.size is not None and path.stat().st_size != sibling.size:
            raise ModelLoadError(
                "corrupt_weights",
                f"{sibling.rfilename}: size "
                f"{path.stat().st_size} != {sibling.size} announced by the hub",
            )
        lfs = sibling.lfs
        if lfs is not None and sha256_file(path) != lfs.sha256:
            raise ModelLoadError("corrupt_weights", f"{sibling.rfilename}: sha256 mismatch")


def destination(source: str, to: Path, revision: str | None) -> Path:
    local = Path(source)
    if local.is_dir():
        return to / local.resolve().name
    if revision is None:
        raise ModelLoadError(
            "bad_config",
            f"{source!r} is not a local directory, so it is "
            "a hub id and needs --revision <commit sha>",
        )
    return hub_dir(to, source, revision)


def download(source: str, to: Path, revision: str | None = None, verify: bool = False) -> Path:
    """Fetch SOURCE (hub id + revision, or a local directory) into TO; return its path."""
    local = Path(source)
    dest = destination(source, to, revision)
    if dest.is_dir():
        if existing_ok(dest, verify):
            return dest
        raise ModelLoadError(
            "corrupt_weights",
            f"{dest} exists but does not match its manifest ({MANIFEST}); it is never "
            "replaced while a daemon may read it: remove it to download again",
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        if local.is_dir():
            _copy_local(local, tmp)
        else:
            assert revision is not None
            _fetch_hub(source, revision, tmp)
        manifest = _manifest(tmp, source, revision)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.chmod(tmp, 0o755)
        _install(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
