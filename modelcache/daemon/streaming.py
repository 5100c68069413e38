"""Streaming loads: shard bytes pass through a small ring of host buffers into parameters
already allocated on the device in their dtype, so host memory is bounded by the ring.

Why: reading whole shards first holds the checkpoint in host memory (16 GB for an 8B
model) before a byte reaches a GPU, and per-tensor copies from pageable memory are
synchronous. Here a chunk of a shard (at most one buffer, whole tensors or slices of
one) is read by the parallel preadv reader of weights.py into a free ring buffer; a
copier thread then moves it to the device (CUDA: one non-blocking copy from pinned memory
into a device staging buffer on a side stream) and scatters it by the conversion plan:
each piece lands in its model tensor, cast to the target dtype on the device. An event
per buffer says when its copy is done, so the next read into it waits only for that, and
reading chunk i+1 overlaps copying chunk i. On the CPU the same code runs with the ring
buffer as its own staging (no pinning: a CPU-only torch cannot pin).

A checkpoint tensor whose pieces are contiguous runs of their model tensors (renames, MoE
experts stacked on dim 0, gate/up halves) is split freely across chunks; one that is
sliced (a fused QKV split) arrives whole in one buffer, which then grows to fit it.

A ``Stream`` is set up under the load lock (it allocates) and run without it (reads and
copies only), so loads onto different devices overlap here and nowhere else (loader.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelcache.daemon import hostmem
from modelcache.daemon.conversion import Piece, Plan, full, index, region_shape
from modelcache.daemon.errors import ModelLoadError
from modelcache.daemon.weights import Shard, TensorInfo, read_range, read_threads
from modelcache.settings import DaemonSettings

#: Where a piece goes: the destination tensor, the piece, and its flat element offset in
#: the destination when the piece is one contiguous run there (None: strided).
Use = tuple[torch.Tensor, Piece, int | None]


@dataclass(frozen=True)
class Segment:
    """File bytes [start, end) of checkpoint tensor ``info``: all of it or a slice."""

    info: TensorInfo
    start: int
    end: int


@dataclass
class Chunk:
    """One ring buffer's worth: file bytes [start, end) of one shard."""

    path: Path
    start: int
    end: int
    segments: list[Segment] = field(default_factory=list)


#: Default buffer size by device. On CUDA large buffers make few, long DMA copies from
#: memory pinned once. On the CPU every fresh page costs a fault on first touch (measured:
#: filling fresh memory ~6x slower than touched memory), so a small ring, faulted once and
#: reused while it is still warm in cache, costs least.
DEFAULT_BUFFER_MIB = {"cuda": 256, "cpu": 32}


def ring_config(device: torch.device) -> tuple[int, int]:
    """(buffers, bytes per buffer) from the settings (MODELCACHE_LOAD_BUFFERS/_MIB)."""
    s = DaemonSettings.model_validate({})
    mib = s.load_buffer_mib or DEFAULT_BUFFER_MIB.get(device.type, 256)
    return s.load_buffers, mib << 20


def model_bytes(shards: Sequence[Shard], dtype: torch.dtype) -> int:
    """The checkpoint's tensors in the target dtype: what the device will hold (an upper
    bound: unused keys count, keep-in-fp32 modules count at ``dtype``)."""
    item = dtype.itemsize
    return sum(
        t.numel * item if t.dtype.is_floating_point else t.end - t.start
        for s in shards
        for t in s.tensors
    )


def check_memory(shards: Sequence[Shard], device: torch.device, dtype: torch.dtype) -> None:
    """Before anything is allocated: the parameters (+ staging on CUDA) must fit in the
    device's free memory, the ring in the host's."""
    count, size = ring_config(device)
    size = min(size, max((s.size for s in shards), default=0))
    params = model_bytes(shards, dtype)
    if device.type == "cpu":
        hostmem.require_device(device, params + count * size, "the model and the load ring")
        return
    hostmem.require_device(device, params + size, "the model's parameters")
    hostmem.require_host(count * size, "the pinned load ring")


def _flat_offset(region: tuple[tuple[int, int], ...], shape: tuple[int, ...]) -> int | None:
    """Flat offset of ``region`` in a row-major tensor of ``shape`` when the region is one
    contiguous run of it (full in every dimension after one, extent 1 before it)."""
    d = len(shape) - 1
    while d >= 0 and region[d] == (0, shape[d]):
        d -= 1
    if any(b - a != 1 for a, b in region[: max(d, 0)]):
        return None
    flat = 0
    for (a, _), n in zip(region, shape, strict=True):
        flat = flat * n + a
    return flat


def uses_of(
    plan: Plan, dests: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]
) -> dict[str, list[Use]]:
    """Checkpoint key -> where its pieces go (see ``Use``)."""
    out: dict[str, list[Use]] = {}
    for ckey, pieces in plan.sources().items():
        out[ckey] = [
            (
                dests[mkey],
                p,
                _flat_offset(p.dst, tuple(dests[mkey].shape))
                if p.src == full(shapes[ckey])
                else None,
            )
            for mkey, p in pieces
        ]
    return out


def plan_chunks(shards: Sequence[Shard], uses: dict[str, list[Use]], size: int) -> list[Chunk]:
    """Cut every used tensor into segments of at most ``size`` bytes (whole when it must
    be) and pack consecutive segments of a shard into chunks of at most ``size`` bytes."""
    chunks: list[Chunk] = []
    for shard in shards:
        current: Chunk | None = None
        for t in shard.tensors:
            if t.name not in uses or not t.numel:
                continue
            step = size if all(off is not None for _, _, off in uses[t.name]) else t.end - t.start
            for a in range(t.start, t.end, step):
                seg = Segment(t, a, min(a + step, t.end))
                if current is not None and seg.end - current.start <= size:
                    current.end = seg.end
                    current.segments.append(seg)
                else:
                    current = Chunk(shard.path, seg.start, seg.end, [seg])
                    chunks.append(current)
    return chunks


def _typed(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bytes as ``dtype``; a slice misaligned for it (odd offsets in the file) is copied."""
    return (raw if raw.storage_offset() % dtype.itemsize == 0 else raw.clone()).view(dtype)


def scatter(stage: torch.Tensor, chunk: Chunk, uses: dict[str, list[Use]]) -> None:
    """Write the chunk's bytes (``stage``, uint8, on the device) into the model tensors."""
    for seg in chunk.segments:
        info = seg.info
        raw = stage[seg.start - chunk.start : seg.end - chunk.start]
        item = info.dtype.itemsize
        first, count = (seg.start - info.start) // item, (seg.end - seg.start) // item
        for dst, piece, off in uses[info.name]:
            if off is not None:
                out = dst.view(-1)[off + first : off + first + count]
                if out.dtype == info.dtype:
                    out.view(torch.uint8).copy_(raw, non_blocking=True)
                else:
                    out.copy_(_typed(raw, info.dtype), non_blocking=True)
            else:
                src = _typed(raw, info.dtype).view(info.shape)[index(piece.src)]
                dst[index(piece.dst)].copy_(src.reshape(region_shape(piece.dst)))


class Ring:
    """``count`` host buffers of ``size`` bytes (pinned for CUDA), and on CUDA one device
    staging buffer and a side stream: stream order makes one staging buffer enough."""

    def __init__(self, count: int, size: int, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.host = [torch.empty(size, dtype=torch.uint8, pin_memory=cuda) for _ in range(count)]
        self.views = [b.numpy().data.cast("B") for b in self.host]
        self.stage = torch.empty(size, dtype=torch.uint8, device=device) if cuda else None
        self.stream = torch.cuda.Stream(device) if cuda else None  # type: ignore[no-untyped-call]
        if self.stream is not None:  # the parameters were allocated on the default stream
            self.stream.wait_stream(torch.cuda.current_stream(device))
        self.pending: list[Future[torch.cuda.Event | None] | None] = [None] * count

    def copy(self, k: int, chunk: Chunk, uses: dict[str, list[Use]]) -> torch.cuda.Event | None:
        """Buffer ``k`` (holding ``chunk``) to its model tensors; on the copier thread."""
        n = chunk.end - chunk.start
        if self.stream is None or self.stage is None:
            scatter(self.host[k][:n], chunk, uses)
            return None
        with torch.cuda.stream(self.stream):
            self.stage[:n].copy_(self.host[k][:n], non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self.stream)  # the host buffer is free once this copy is done
            scatter(self.stage[:n], chunk, uses)
        return event

    def wait(self, k: int) -> None:
        fut, self.pending[k] = self.pending[k], None
        if fut is not None and (event := fut.result()) is not None:
            event.synchronize()

    def close(self) -> None:
        for k in range(len(self.pending)):
            fut, self.pending[k] = self.pending[k], None
            if fut is not None:
                fut.exception()  # finished either way; the first error was raised already
        if self.stream is not None:
            self.stream.synchronize()


class Stream:
    """One streamed load in two steps. Set up (``__init__``: the chunk plan, the memory
    check and the ring's allocation) while the caller holds the load lock, because
    allocating goes through torch functions a concurrent model build may have patched; then
    ``run``, the reads and copies, which touch no process-global state, so the loader runs
    it without the lock and a load onto another device may build meanwhile."""

    def __init__(
        self,
        shards: Sequence[Shard],
        plan: Plan,
        dests: dict[str, torch.Tensor],
        device: torch.device,
    ) -> None:
        shapes = {t.name: t.shape for s in shards for t in s.tensors}
        self.uses = uses_of(plan, dests, shapes)
        count, size = ring_config(device)
        self.chunks = plan_chunks(shards, self.uses, size)
        size = max((c.end - c.start for c in self.chunks), default=0)
        count = min(count, len(self.chunks))
        hostmem.require_host(count * size, "the load ring")
        self.ring: Ring | None = Ring(count, size, device)

    def run(self) -> None:
        """Read every planned checkpoint tensor into its destination through the ring.
        Fails as corrupt_weights if a file cannot be read or shrank. The ring is released
        either way (its pinned pages handed back)."""
        ring, self.ring = self.ring, None
        if ring is None:
            raise RuntimeError("a Stream runs once")
        fds: dict[Path, int] = {}
        error: BaseException | None = None
        try:
            self._pump(ring, fds)
        except BaseException as exc:  # raised again below, once the ring is gone
            error = _without_frames(exc)
        try:
            ring.close()
        finally:
            del ring  # the last reference: its buffers are freed here, failed or not
            hostmem.release_pinned()
            for fd in fds.values():
                os.close(fd)
        if error is not None:
            raise error

    def _pump(self, ring: Ring, fds: dict[Path, int]) -> None:
        count, uses, threads = len(ring.host), self.uses, read_threads()
        with (
            ThreadPoolExecutor(threads, thread_name_prefix="modelcache-read") as readers,
            ThreadPoolExecutor(1, thread_name_prefix="modelcache-copy") as copier,
        ):
            for i, chunk in enumerate(self.chunks):
                k = i % count
                ring.wait(k)
                _read(chunk, ring.views[k], fds, readers if threads > 1 else None)
                ring.pending[k] = copier.submit(ring.copy, k, chunk, uses)
            for k in range(count):
                ring.wait(k)


def _without_frames(exc: BaseException) -> BaseException:
    """``exc`` and the exceptions chained to it, stripped of their tracebacks: a failed
    read's frames hold a ring buffer (``_read``'s view, ``Ring.copy``'s ``self``), and the
    error outlives the load (the registry keeps it), which would keep the pinned ring alive
    and page-locked after ``release_pinned``."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        link = todo.pop()
        if link is not None and id(link) not in seen:
            seen.add(id(link))
            link.__traceback__ = None
            todo += [link.__cause__, link.__context__]
    return exc


def _read(
    chunk: Chunk, view: memoryview, fds: dict[Path, int], pool: ThreadPoolExecutor | None
) -> None:
    try:
        if chunk.path not in fds:
            fds[chunk.path] = os.open(chunk.path, os.O_RDONLY)
        got = read_range(fds[chunk.path], view, chunk.start, chunk.end, pool)
    except OSError as exc:
        raise ModelLoadError(
            "corrupt_weights", f"{chunk.path}: read failed: {exc.strerror}"
        ) from None
    if got != chunk.end - chunk.start:
        raise ModelLoadError(
            "corrupt_weights",
            f"{chunk.path}: file shrank while reading (bytes {chunk.start}..{chunk.end} "
            f"came back {got} long)",
        )
