"""How much memory a load may still take, asked before it takes it.

Why: a read into fresh anonymous memory faults its pages in one by one; when the machine
(or the pod's cgroup) runs out, the kernel does not fail an allocation, it SIGKILLs the
daemon and every model it serves goes with it. Checking ``MemAvailable`` (and the cgroup's
limit minus its working set, which is what the kubelet and the OOM killer go by) before
allocating turns that into an ``out_of_memory`` load failure of one model, naming the bytes.
On CUDA the same question goes to the driver (``torch.cuda.mem_get_info``) before any
parameter is allocated, so an 8B model on a half-full GPU fails in milliseconds, not after
the read. The check is advisory (others may allocate after it), but it catches the common
case: a model that never fitted.
"""

from __future__ import annotations

from pathlib import Path

import torch

from modelcache.daemon.errors import ModelLoadError

MEMINFO = Path("/proc/meminfo")
PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: A cgroup limit this large means "no limit" (v1 reports 2^63 rounded down to a page).
_UNLIMITED = 1 << 60
GIB = 1 << 30


def _meminfo_available() -> int | None:
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text) if text.isdigit() else None


def _file_cache(stat: Path) -> int:
    """Page cache the kernel reclaims before it kills (inactive and active file pages; the
    ``total_`` keys of cgroup v1 count the whole subtree): not part of the working set. A
    checkpoint read twice (a retry, two model names) sits in active_file."""
    values: dict[str, int] = {}
    try:
        for line in stat.read_text().splitlines():
            key, _, value = line.partition(" ")
            values[key] = int(value)
    except (OSError, ValueError):
        return 0
    total = sum(values.get(f"total_{k}", 0) for k in ("inactive_file", "active_file"))
    return total or sum(values.get(k, 0) for k in ("inactive_file", "active_file"))


def _cgroup_dirs() -> list[Path]:
    """This process's memory cgroup directories, leaf first, up to the mounted root."""
    out: list[Path] = []
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified
            base = CGROUP_ROOT
        elif "memory" in controllers.split(","):  # v1
            base = CGROUP_ROOT / "memory"
        else:
            continue
        rel = Path(path.lstrip("/"))
        for part in [rel, *rel.parents]:
            d = base / part
            if d.is_dir() and d not in out:
                out.append(d)
    return out


def _cgroup_available() -> int | None:
    """Headroom under the tightest memory limit on the way to the root, if any is set."""
    best: int | None = None
    for d in _cgroup_dirs():
        v2 = (d / "memory.max").exists()
        limit = _read_int(d / ("memory.max" if v2 else "memory.limit_in_bytes"))
        usage = _read_int(d / ("memory.current" if v2 else "memory.usage_in_bytes"))
        if limit is None or usage is None or limit >= _UNLIMITED:
            continue
        room = max(0, limit - usage + _file_cache(d / "memory.stat"))
        best = room if best is None else min(best, room)
    return best


def available_bytes() -> int | None:
    """Host memory this process may still fault in: MemAvailable, or less under a cgroup
    limit. None when neither can be read (no /proc): the check is then skipped."""
    values = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(values) if values else None


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory where the model's parameters will live: the driver's answer on CUDA,
    the host's on CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Blocks torch's caching allocator holds but no tensor uses count as used for the
        # driver, yet the allocator frees them and retries before it fails: they fit too.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free) + max(0, int(cached))
    return available_bytes()


def _gib(n: int) -> str:
    return f"{n} bytes ({n / GIB:.2f} GiB)"


def require(needed: int, free: int | None, where: str, what: str) -> None:
    """Fail as ``out_of_memory`` when ``needed`` bytes exceed ``free`` (None: unknown)."""
    if free is not None and needed > free:
        raise ModelLoadError(
            "out_of_memory",
            f"{what} needs {_gib(needed)} of {where} memory but only {_gib(free)} is free; "
            "not loading (a smaller dtype, another device or fewer models would fit)",
        )


def require_host(needed: int, what: str) -> None:
    require(needed, available_bytes(), "host", what)


def require_device(device: torch.device, needed: int, what: str) -> None:
    where = "host" if device.type == "cpu" else str(device)
    require(needed, device_free_bytes(device), where, what)


def release_pinned() -> None:
    """Hand the load ring's pinned pages back once a load is done.

    Why: torch's host caching allocator keeps a freed pinned block for reuse, so the ring
    (1 GiB by default on CUDA) would stay page-locked, unswappable and charged to the
    pod's memory limit for as long as the daemon runs. Only unused blocks go: pinned
    inputs of batches in flight stay. A torch without the call keeps its cache (older
    torch: the private spelling)."""
    if not torch.cuda.is_available():
        return
    empty = getattr(torch.accelerator, "empty_host_cache", None) or getattr(
        torch._C, "_host_emptyCache", None
    )
    if empty is not None:
        empty()
