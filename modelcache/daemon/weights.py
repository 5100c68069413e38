"""Reading safetensors checkpoints into memory the process owns.

Why not ``safetensors.torch.load_file``/transformers' default: on CPU those tensors stay
memory-mapped to the file, so rewriting a file in place silently changes a live model and
truncating it kills the process with SIGBUS (measured, issue #2). Here each shard is read
once into one uninitialised buffer, in parallel spans (one thread per core: on a warm page
cache the copy is CPU-bound, so this beats one sequential read); tensors are zero-copy views
of that buffer, so the model never depends on the file again.

The header is parsed and checked before anything is read (offsets inside the file,
contiguous, dtypes known, sizes consistent) so a corrupt or truncated file fails with a
message that says which file and what is wrong instead of an opaque Rust panic.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from modelcache.daemon.errors import ModelLoadError
from modelcache.settings import DaemonSettings

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Shard:
    path: Path
    size: int
    tensors: tuple[TensorInfo, ...]


def _corrupt(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError("corrupt_weights", f"{path}: {what}")


def read_header(path: Path) -> Shard:
    """Parse and validate a safetensors header without reading the tensor data."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise _corrupt(path, f"file is {size} bytes, too short for a safetensors header")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                raise _corrupt(path, f"header length {hlen} does not fit in a {size}-byte file")
            header_bytes = f.read(hlen)
    except OSError as exc:
        raise ModelLoadError("not_found", f"cannot read {path}: {exc.strerror}") from None
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    base = 8 + hlen
    infos: list[TensorInfo] = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"tensor {name!r} has a malformed header entry") from None
        item = torch.empty((), dtype=dtype).element_size()
        if any(d < 0 for d in shape) or end - begin != math.prod(shape) * item or begin > end:
            raise _corrupt(
                path,
                f"tensor {name!r}: offsets {begin}..{end} do not match "
                f"shape {list(shape)} of {meta['dtype']}",
            )
        infos.append(TensorInfo(name, dtype, shape, base + begin, base + end))
    infos.sort(key=lambda t: t.start)
    expected = base
    for t in infos:
        if t.start != expected:
            raise _corrupt(
                path,
                f"tensor {t.name!r} starts at byte {t.start}, expected {expected} "
                "(overlapping or gapped data)",
            )
        expected = t.end
    if expected != size:
        raise _corrupt(
            path,
            f"header describes {expected} bytes but the file has {size} "
            f"({'truncated' if size < expected else 'trailing data'})",
        )
    return Shard(path=path, size=size, tensors=tuple(infos))


def find_shards(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files; pickle checkpoints are refused."""
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise _corrupt(index, f"unreadable shard index ({exc})") from None
        shards = []
        for name in sorted(set(weight_map.values())):
            if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
                raise _corrupt(index, f"shard name {name!r} is not a plain file name")
            shards.append(model_dir / name)
        return shards
    if single.is_file():
        return [single]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise ModelLoadError(
            "not_found",
            f"{model_dir} has only pickle weights (*.bin/*.pt); modelcache loads safetensors "
            "only, because unpickling can execute code. Convert the checkpoint to safetensors.",
        )
    raise ModelLoadError(
        "not_found", f"no model.safetensors or model.safetensors.index.json in {model_dir}"
    )


# Reads are split in spans of this size, read in parallel (os.preadv releases the GIL).
READ_SPAN_BYTES = 32 << 20


def read_threads() -> int:
    """Threads that read a shard: MODELCACHE_READ_THREADS, or one per usable CPU, at most 8.

    Copying out of the page cache (and faulting in the fresh buffer) is CPU work: one thread
    per core reads a warm file about twice as fast on 2 cores as one sequential read."""
    configured = DaemonSettings.model_validate({}).read_threads
    return configured or max(1, min(8, len(os.sched_getaffinity(0))))


def _read_span(fd: int, view: memoryview, start: int, end: int, base: int = 0) -> int:
    """Read file bytes [start, end) into ``view[start - base : end - base]``."""
    got = start
    while got < end:
        n = os.preadv(fd, [view[got - base : end - base]], got)
        if not n:  # end of file: the caller sees the short count
            break
        got += n
    return got - start


def spans(start: int, end: int) -> list[tuple[int, int]]:
    return [(a, min(a + READ_SPAN_BYTES, end)) for a in range(start, end, READ_SPAN_BYTES)]


def read_range(
    fd: int, view: memoryview, start: int, end: int, pool: ThreadPoolExecutor | None
) -> int:
    """File bytes [start, end) into ``view`` (which starts at file offset ``start``), in
    parallel spans on ``pool`` (sequential without one); returns the bytes read. The
    streaming loader keeps one pool for a whole load instead of one per shard."""
    parts = spans(start, end)
    if pool is None or len(parts) == 1:
        return sum(_read_span(fd, view, a, b, start) for a, b in parts)
    return sum(pool.map(lambda span: _read_span(fd, view, span[0], span[1], start), parts))


def _read_spans(fd: int, view: memoryview, parts: list[tuple[int, int]], workers: int) -> int:
    if workers > 1:
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="modelcache-read") as pool:
                return sum(pool.map(lambda span: _read_span(fd, view, *span), parts))
        except RuntimeError as exc:  # "can't start new thread": a pids limit, say
            log.warning("parallel read unavailable (%s): reading sequentially", exc)
    return sum(_read_span(fd, view, a, b) for a, b in parts)


def read_shard(shard: Shard, threads: int | None = None) -> dict[str, torch.Tensor]:
    """Read a whole shard into owned memory and return zero-copy tensor views of it.

    The buffer is an uninitialised uint8 tensor (no zero-fill: every byte is overwritten by
    the read), so the cost is the read itself; spans of it are read by ``threads`` threads
    (default ``read_threads()``) at once.
    """
    buf = torch.empty(shard.size, dtype=torch.uint8)
    view = buf.numpy().data.cast("B")
    parts = spans(0, shard.size)
    workers = min(threads or read_threads(), len(parts))
    try:
        fd = os.open(shard.path, os.O_RDONLY)
        try:
            got = _read_spans(fd, view, parts, workers)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _corrupt(shard.path, f"read failed: {exc.strerror}") from None
    if got != shard.size:
        raise _corrupt(shard.path, f"file shrank while reading ({got} of {shard.size} bytes)")
    out: dict[str, torch.Tensor] = {}
    for t in shard.tensors:
        raw = buf[t.start : t.end]
        item = raw.new_empty((), dtype=t.dtype).element_size()
        if t.start % item:  # misaligned for this dtype: copy instead of viewing
            raw = raw.clone()
        out[t.name] = (
            raw.view(t.dtype).view(t.shape) if t.numel else torch.empty(t.shape, dtype=t.dtype)
        )
    return out


def sample_indices(numel: int, k: int = 16) -> list[int]:
    """Deterministic flat indices covering a tensor's start, end and interior."""
    if numel <= k:
        return list(range(numel))
    step = (numel - 1) / (k - 1)
    return sorted({round(i * step) for i in range(k)})


def read_samples(info: TensorInfo, path: Path, indices: Iterable[int]) -> torch.Tensor:
    """Read single elements straight from the file (pread), independent of any loaded copy."""
    item = torch.empty((), dtype=info.dtype).element_size()
    idx = list(indices)
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = [os.pread(fd, item, info.start + i * item) for i in idx]
    finally:
        os.close(fd)
    data = bytearray(b"".join(chunks))
    if len(data) != item * len(idx):
        raise _corrupt(path, f"tensor {info.name!r} could not be re-read for verification")
    if not data:
        return torch.empty(0, dtype=info.dtype)
    return torch.frombuffer(data, dtype=info.dtype).clone()
