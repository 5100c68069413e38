"""A batch's way onto the device and back: one host→device copy in, one device→host copy out.

Why it matters on a GPU: every synchronous copy stalls the CPU until the device has drained
its queue, so a batch that sends ids and mask separately, then fetches eight result tensors,
pays nine round trips of latency between forward passes (the old log-prob path did).
Here the ids and the mask travel as one pinned int64 tensor, copied without blocking (the
forward's kernels queue behind it), and results are packed by the caller into one tensor
fetched with one copy. On a CPU device none of this costs anything: ``to`` is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask, on ``device``. Right padding keeps
    positions 0..n-1 for every real token; causal models never attend to the padding on
    their right."""
    width = max(len(s) for s in seqs)
    both = np.zeros((2, len(seqs), width), dtype=np.int64)
    both[0].fill(pad_id)
    for row, s in enumerate(seqs):
        both[0, row, : len(s)] = s
        both[1, row, : len(s)] = 1
    host = torch.from_numpy(both)
    if device.type == "cuda":
        # Pinned memory lets the copy run asynchronously (DMA from page-locked memory);
        # the caching host allocator reuses the pinned block on the next batch.
        host = host.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        host = host.to(device)
    return host[0], host[1]


def to_host(packed: torch.Tensor) -> np.ndarray:
    """The one device→host copy of a batch's packed results (a numpy view on CPU)."""
    out: np.ndarray = packed.cpu().numpy()
    return out
