"""Post-load checks: nothing on meta, everything where it should be, weights equal to the
files, and a forward pass that is finite and deterministic.

These run on every load. None of them "repairs" anything: the popular fix for meta
tensors, ``to_empty()`` + ``reset_parameters()``, replaces pretrained weights with random
ones while making the error go away (seed 001). A failed check fails the load.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from modelcache.daemon.errors import ModelLoadError
from modelcache.daemon.weights import TensorInfo, read_samples, sample_indices
from modelcache.metrics import META_TENSOR_ERRORS

CANARY_TEXT = "modelcache canary: the quick brown fox jumps over the lazy dog."
CANARY_TOKENS = 8


def _names(items: list[str], limit: int = 8) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_placement(
    model: torch.nn.Module,
    name: str,
    device: torch.device,
    dtypes: Mapping[str, torch.dtype] | torch.dtype,
) -> None:
    """Every parameter and every buffer (persistent or not) is real, on the device, and
    floating-point ones have the requested dtype.

    Buffers matter: non-persistent ones (``position_ids``, rotary ``inv_freq``) are not in
    checkpoints, and left on meta they give finite but wrong outputs (cos 0.01-0.10).
    """
    meta_params = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    meta_buffers = [n for n, b in model.named_buffers(remove_duplicate=False) if b.is_meta]
    if meta_params:
        META_TENSOR_ERRORS.labels(model=name, kind="parameter").inc(len(meta_params))
    if meta_buffers:
        META_TENSOR_ERRORS.labels(model=name, kind="buffer").inc(len(meta_buffers))
    if meta_params or meta_buffers:
        raise ModelLoadError(
            "meta_tensor",
            f"tensors left on the meta device (no data): parameters [{_names(meta_params)}] "
            f"buffers [{_names(meta_buffers)}]; refusing to serve a model with random or "
            "missing weights",
        )
    tensors: list[tuple[str, torch.Tensor]] = list(model.named_parameters(remove_duplicate=False))
    tensors += list(model.named_buffers(remove_duplicate=False))
    wrong_device = [
        n
        for n, t in tensors
        if t.device.type != device.type
        or (device.index is not None and t.device.index != device.index)
    ]
    if wrong_device:
        raise ModelLoadError("verify_failed", f"tensors not on {device}: {_names(wrong_device)}")

    def expected(n: str) -> torch.dtype:
        return dtypes if isinstance(dtypes, torch.dtype) else dtypes.get(n, torch.float32)

    wrong_dtype = [
        f"{n} ({p.dtype}, expected {expected(n)})"
        for n, p in model.named_parameters()
        if p.is_floating_point() and p.dtype != expected(n)
    ]
    if wrong_dtype:
        raise ModelLoadError(
            "verify_failed", f"parameters in the wrong dtype: {_names(wrong_dtype)}"
        )


def _take(tensor: torch.Tensor | Callable[[list[int]], torch.Tensor], idx: list[int]) -> Any:
    if not isinstance(tensor, torch.Tensor):  # a converted tensor: see reverse.live_views
        return tensor(idx)
    flat = tensor.detach().reshape(-1)
    return flat[torch.tensor(idx, dtype=torch.long, device=tensor.device)].cpu()


def fingerprint(
    live: Mapping[str, torch.Tensor | Callable[[list[int]], torch.Tensor]],
    files: Mapping[str, tuple[TensorInfo, Path]],
) -> str:
    """Hash a deterministic sample of every checkpoint tensor, after checking that the
    live model holds exactly what the file holds at those positions.

    ``files`` maps checkpoint key -> (TensorInfo, path); samples are re-read from the file
    with pread, so a buffer that went wrong anywhere between disk and device is caught.
    ``live`` maps checkpoint key -> the model tensor it became, or for a converted tensor
    (fused experts, split QKV) a function giving its live values at flat positions of the
    checkpoint tensor (the reverse conversion), so every slice is checked against its file.
    """
    h = hashlib.sha256()
    mismatched: list[str] = []
    for key in sorted(files):
        info, path = files[key]
        idx = sample_indices(info.numel)
        from_file = read_samples(info, path, idx)
        got = _take(live[key], idx)
        if from_file.is_floating_point() and got.is_floating_point():
            from_file = from_file.to(got.dtype)
        if got.dtype != from_file.dtype or not torch.equal(
            got.view(torch.uint8) if got.numel() else got,
            from_file.view(torch.uint8) if from_file.numel() else from_file,
        ):
            mismatched.append(key)
            continue
        h.update(key.encode())
        h.update(repr((info.shape, str(got.dtype))).encode())
        h.update(got.view(torch.uint8).numpy().tobytes() if got.numel() else b"")
    if mismatched:
        raise ModelLoadError(
            "verify_failed",
            f"live weights differ from the checkpoint files for [{_names(mismatched)}] (a file "
            "changed during the load, a tied weight the checkpoint stores untied, or a "
            "conversion bug)",
        )
    return h.hexdigest()


def check_finite(model: torch.nn.Module) -> None:
    """Every floating-point parameter is finite. The canary pass uses the embedding rows of
    its own few tokens only, and safetensors files carry no checksums: a damaged file with
    one NaN row in an embedding matrix would load, and every request with that token would
    get NaN back with status OK. One min/max reduction per tensor (NaN propagates through
    it): 20 ms for 500 MB on a CPU, no temporary copies."""
    bad = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (
                p.is_floating_point()
                and p.numel()
                and not all(bool(torch.isfinite(v)) for v in torch.aminmax(p.detach()))
            ):
                bad.append(name)
    if bad:
        raise ModelLoadError(
            "verify_failed", f"non-finite values (NaN or Inf) in the weights [{_names(bad)}]"
        )


def _routes_tokens(model: torch.nn.Module) -> bool:
    """Mixture-of-experts: each expert multiplies the tokens routed to it, gathered, so
    where a row sits in the batch changes the matmul's blocking and its last bits."""
    return any(type(m).__name__.endswith("Experts") for m in model.modules())


def _canary_pass(model: torch.nn.Module, inputs: dict[str, torch.Tensor], task: str) -> Any:
    with torch.inference_mode():
        out = model(**inputs)
        return (out.logits if task == "causal-lm" else out.last_hidden_state).float().cpu()


def canary(model: torch.nn.Module, tokenizer: object, task: str, device: torch.device) -> str:
    """One forward pass over the canary text, twice in one batch: outputs must be finite and
    both rows bit-identical. Returns a digest of the output.

    Two identical rows in one pass catch non-deterministic kernels (split reductions,
    atomics) at the cost of one pass instead of two: for a large model the pass is
    memory-bound, so a second pass would cost as much as a large share of the read.
    Mixture-of-experts models get two one-row passes instead: their rows legitimately
    differ in the last bits with their position in the batch (measured on tiny Mixtral).
    """
    enc = tokenizer(CANARY_TEXT, return_tensors="pt")  # type: ignore[operator]
    # A few tokens suffice: every weight is still read once.
    inputs = {
        k: v[:, :CANARY_TOKENS].to(device)
        for k, v in enc.items()
        if k in ("input_ids", "attention_mask", "token_type_ids")
    }
    if _routes_tokens(model):
        t = torch.cat([_canary_pass(model, inputs, task) for _ in range(2)])
    else:
        t = _canary_pass(model, {k: v.repeat(2, 1) for k, v in inputs.items()}, task)
    if not torch.isfinite(t).all():
        raise ModelLoadError("verify_failed", "canary forward pass produced NaN or Inf")
    if not torch.equal(t[0], t[1]):
        raise ModelLoadError(
            "verify_failed",
            "canary forward pass is not deterministic (identical rows gave different outputs)",
        )
    return hashlib.sha256(t[0].numpy().tobytes()).hexdigest()
