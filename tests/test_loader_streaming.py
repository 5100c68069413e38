"""The streaming load path (issue 12), driven on the CPU: every architecture of the zoo
matrix loads through a deliberately tiny ring (2 x 1 MiB, so embeddings and fused expert
tensors are cut across buffers) bit-identically to the whole-shard path — parameters,
persistent and non-persistent buffers, dtypes, fingerprint and canary."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import zoo_models
from loader_helpers import load_one
from zoo_archs import ARCHS
from zoo_models import Arch

from modelcache.daemon import loader, streaming
from modelcache.daemon.registry import ModelState


def _spec(arch: Arch, dtype: str | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {"dtype": dtype or arch.dtype, **arch.spec}
    if arch.task == "embedding":
        extra["pooling"] = arch.pooling
    return extra


def _load(path: Path, arch: Arch, monkeypatch: pytest.MonkeyPatch, stream: bool, **kw: Any) -> Any:
    with monkeypatch.context() as m:
        m.setenv("MODELCACHE_STREAMING_LOAD", "1" if stream else "0")
        m.setenv("MODELCACHE_LOAD_BUFFERS", "2")
        m.setenv("MODELCACHE_LOAD_BUFFER_MIB", "1")
        calls: list[int] = []
        real = streaming.Stream.run

        def counted(self: streaming.Stream) -> None:
            calls.append(1)
            real(self)

        m.setattr(streaming.Stream, "run", counted)
        entry = load_one(path, arch.task, **_spec(arch, **kw))
    assert entry.state is ModelState.READY, entry.error
    assert calls == ([1] if stream else []), "the path under test did not run"
    return entry.loaded


def _same(a: Any, b: Any) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        assert v.dtype == sb[k].dtype and v.device == sb[k].device, k
        assert torch.equal(v, sb[k]), k
    ba, bb = dict(a.model.named_buffers()), dict(b.model.named_buffers())
    assert ba.keys() == bb.keys()
    for k, v in ba.items():
        assert v.dtype == bb[k].dtype and torch.equal(v, bb[k]), k
    pa = {k: p.data_ptr() for k, p in a.model.named_parameters(remove_duplicate=False)}
    pb = {k: p.data_ptr() for k, p in b.model.named_parameters(remove_duplicate=False)}
    ties_a = {k for k in pa if list(pa.values()).count(pa[k]) > 1}
    ties_b = {k for k in pb if list(pb.values()).count(pb[k]) > 1}
    assert ties_a == ties_b, "tied parameters differ"
    # Weights are equal bit for bit; outputs may differ in the last bits where a kernel's
    # blocking depends on the weights' address (MoE expert matmuls: the whole-shard path
    # serves views at the file's offsets, streaming fresh aligned storage).
    assert a.fingerprint == b.fingerprint
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.inference_mode():
        oa, ob = (m.model(input_ids=ids) for m in (a, b))
    ka = "logits" if "logits" in oa else "last_hidden_state"
    assert torch.allclose(oa[ka].float(), ob[ka].float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.id)
def test_streaming_loads_bit_identically(
    tmp_path: Path, arch: Arch, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = zoo_models.build(arch, tmp_path / arch.id)
    whole = _load(path, arch, monkeypatch, stream=False)
    streamed = _load(path, arch, monkeypatch, stream=True)
    _same(whole, streamed)


CASTS = {"llama-lm": "bfloat16", "mixtral-lm-fused_experts": "bfloat16"}
CASTS |= {"nomic_bert-embed": "float16", "gpt_oss-lm": "float16", "deepseek_v3-lm": "bfloat16"}


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.id in CASTS], ids=lambda a: a.id)
def test_streaming_casts_like_the_whole_read(
    tmp_path: Path, arch: Arch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Casts on the device (fused experts, split QKV, keep-in-fp32 modules) give the same
    bits as the whole-shard path's casts."""
    path = zoo_models.build(arch, tmp_path / arch.id)
    dtype = CASTS[arch.id]
    whole = _load(path, arch, monkeypatch, stream=False, dtype=dtype)
    streamed = _load(path, arch, monkeypatch, stream=True, dtype=dtype)
    _same(whole, streamed)
    assert {p.dtype for p in streamed.model.parameters()} >= {getattr(torch, dtype)}


def test_chunks_cover_every_used_byte_once_within_the_buffer(tmp_path: Path) -> None:
    """The plan the ring runs: used tensors covered exactly, split where they may be,
    whole where they must be (nomic's fused Wqkv is split into q/k/v by the plan)."""
    arch = next(a for a in ARCHS if a.id == "nomic_bert-embed")
    path = zoo_models.build(arch, tmp_path / arch.id)
    from modelcache.config import parse_config
    from modelcache.daemon.conversion import plan_conversion
    from modelcache.daemon.materialize import construct_on, destinations
    from modelcache.daemon.resolve import prepare_model

    cfg = parse_config({"models": [{"name": "m", "source": str(path), "task": "embedding"}]})
    prepared = prepare_model(cfg.models[0], cfg)
    model = construct_on(prepared, torch.device("cpu"), torch.float32)
    shapes = {t.name: t.shape for s in prepared.shards for t in s.tensors}
    plan = plan_conversion(model, shapes)
    uses = streaming.uses_of(
        plan, destinations(model, plan, torch.float32, torch.device("cpu")), shapes
    )
    size = 64 << 10
    chunks = streaming.plan_chunks(prepared.shards, uses, size)
    covered: dict[str, int] = {}
    for c in chunks:
        assert c.start == c.segments[0].start and c.end == c.segments[-1].end
        whole = len(c.segments) == 1 and c.segments[0].end - c.segments[0].start > size
        assert c.end - c.start <= size or whole
        for s in c.segments:
            covered[s.info.name] = covered.get(s.info.name, 0) + s.end - s.start
    infos = {t.name: t for s in prepared.shards for t in s.tensors}
    assert covered == {k: infos[k].end - infos[k].start for k in uses if infos[k].numel}
    strided = [k for k, us in uses.items() if any(off is None for *_, off in us)]
    assert strided and all("Wqkv" in k for k in strided)
    split = {
        s.info.name
        for c in chunks
        for s in c.segments
        if s.end - s.start < infos[s.info.name].end - infos[s.info.name].start
    }
    assert split and not split & set(strided)


def test_loader_streams_on_cuda_only_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELCACHE_STREAMING_LOAD", raising=False)
    assert loader.streams(torch.device("cuda", 0)) and not loader.streams(torch.device("cpu"))
    monkeypatch.setenv("MODELCACHE_STREAMING_LOAD", "true")
    assert loader.streams(torch.device("cpu"))
    monkeypatch.setenv("MODELCACHE_STREAMING_LOAD", "0")
    assert not loader.streams(torch.device("cuda", 0))


@pytest.mark.parametrize("where", ["read", "copy"])
def test_a_failed_stream_frees_its_ring_before_handing_pinned_pages_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A read or copy that fails mid-stream: the error's frames held a ring buffer (the
    read's view, the copier's ring), so on CUDA the buffers went back to torch's host cache
    only after ``release_pinned`` ran, and stayed page-locked. They must be gone by then."""
    import tiny_models

    from modelcache.daemon import hostmem

    monkeypatch.setenv("MODELCACHE_STREAMING_LOAD", "1")
    monkeypatch.setenv("MODELCACHE_LOAD_BUFFERS", "2")
    monkeypatch.setenv("MODELCACHE_LOAD_BUFFER_MIB", "1")
    path = tiny_models.llama(tmp_path / "llama")
    buffers: list[weakref.ref[torch.Tensor]] = []
    real_init = streaming.Ring.__init__

    def init(self: streaming.Ring, *a: Any) -> None:
        real_init(self, *a)
        buffers.extend(weakref.ref(b) for b in self.host)

    def fail(*a: Any) -> Any:
        raise OSError(5, "injected I/O error") if where == "read" else RuntimeError("injected")

    alive_at_release: list[int] = []
    monkeypatch.setattr(streaming.Ring, "__init__", init)
    monkeypatch.setattr(streaming, "read_range" if where == "read" else "scatter", fail)
    monkeypatch.setattr(
        hostmem,
        "release_pinned",
        lambda: alive_at_release.append(sum(r() is not None for r in buffers)),
    )
    entry = load_one(path, "causal-lm")
    assert entry.state is ModelState.FAILED and "injected" in entry.error, entry.error
    assert buffers and alive_at_release == [0]
