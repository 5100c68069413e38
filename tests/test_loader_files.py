"""The loaded model owns its memory; broken files fail with a message naming the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import tiny_models
import torch
from loader_helpers import load_one, metric, outputs, spec

from modelcache.config import parse_config
from modelcache.daemon.registry import ModelRegistry, ModelState


def test_rewriting_the_file_in_place_after_load_changes_nothing(tmp_path: Path) -> None:
    """Measured with plain transformers on CPU: the model is mmapped, cos drops to 0.06."""
    path = tiny_models.bert(tmp_path / "bert")
    lm = load_one(path, "embedding").loaded
    assert lm is not None
    inputs = tiny_models.encode(path)
    before = outputs(lm.model, inputs, "embedding")
    f = path / "model.safetensors"
    size = f.stat().st_size
    with f.open("r+b") as fh:  # same size, same header, garbage data: an in-place rewrite
        header_len = int.from_bytes(fh.read(8), "little")
        fh.seek(8 + header_len)
        fh.write(os.urandom(size - 8 - header_len))
    assert torch.equal(outputs(lm.model, inputs, "embedding"), before)


def test_truncating_the_file_after_load_does_not_kill_the_process(tmp_path: Path) -> None:
    """With mmapped weights this is SIGBUS; run it in a child so a crash is a failure here."""
    path = tiny_models.bert(tmp_path / "bert")
    code = textwrap.dedent(f"""
        import os, torch
        os.environ["HF_HUB_OFFLINE"] = "1"
        from modelcache.config import parse_config
        from modelcache.daemon.registry import ModelRegistry
        r = ModelRegistry(parse_config({{"models": [{{"name": "m", "source": {str(path)!r},
                                                      "task": "embedding"}}]}}))
        r.prepare()
        lm = r.get("m")
        os.truncate({str(path / "model.safetensors")!r}, 100)
        ids = torch.tensor([[101, 2023, 102]])
        with torch.inference_mode():
            h = lm.model(input_ids=ids).last_hidden_state
            s = sum(float(p.float().sum()) for p in lm.model.parameters())
        print("alive", bool(torch.isfinite(h).all()), s != 0)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "alive True True" in proc.stdout


def test_truncated_file_fails_with_the_file_named(tmp_path: Path) -> None:
    path = tiny_models.gpt2(tmp_path / "gpt2")
    f = path / "model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)
    before = metric("modelcache_model_loads_total", model="m", outcome="corrupt_weights")
    entry = load_one(path, "causal-lm")
    assert entry.state is ModelState.FAILED and entry.error_class == "corrupt_weights"
    assert str(f) in entry.error and "truncated" in entry.error
    assert (
        metric("modelcache_model_loads_total", model="m", outcome="corrupt_weights") == before + 1
    )


def test_corrupt_header_fails_with_the_file_named(tmp_path: Path) -> None:
    path = tiny_models.gpt2(tmp_path / "gpt2")
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe{["
    f.write_bytes(bytes(data))
    entry = load_one(path, "causal-lm")
    assert entry.error_class == "corrupt_weights" and "not valid JSON" in entry.error


def test_header_offsets_that_lie_are_caught(tmp_path: Path) -> None:
    path = tiny_models.gpt2(tmp_path / "gpt2")
    f = path / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [s * 2 for s in header[name]["shape"]]
    new = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(new) == n
    f.write_bytes(raw[:8] + new + raw[8 + n :])
    entry = load_one(path, "causal-lm")
    assert entry.error_class == "corrupt_weights" and name in entry.error


def test_pickle_only_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tiny_models.bert(tmp_path / "bert")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    entry = load_one(path, "embedding")
    assert entry.error_class == "not_found" and "safetensors only" in entry.error


def test_missing_directory_says_where_it_looked(tmp_path: Path) -> None:
    entry = load_one(tmp_path / "nowhere", "embedding")
    assert entry.error_class == "not_found" and str(tmp_path / "nowhere") in entry.error


def test_hub_id_not_on_the_volume_says_how_to_fetch_it(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "models": [
                {"name": "m", "source": "org/model", "revision": "a" * 40, "task": "causal-lm"}
            ],
            "model_root": str(tmp_path),
        }
    )
    r = ModelRegistry(cfg)
    r.prepare()
    e = r.entry("m")
    assert e.error_class == "not_found"
    assert str(tmp_path / "org" / "model" / ("a" * 40)) in e.error
    assert "modelcache download org/model --revision" in e.error


def test_sources_cannot_escape_the_model_volume(tmp_path: Path) -> None:
    root = tmp_path / "volume"
    root.mkdir()
    outside = tiny_models.bert(tmp_path / "outside")
    (root / "link").symlink_to(outside)
    cfg = parse_config(
        {
            "model_root": str(root),
            "models": [
                spec("dotdot", Path("../outside"), "embedding"),
                spec("symlink", Path("link"), "embedding"),
                spec("absolute", outside, "embedding"),
            ],
        }
    )
    r = ModelRegistry(cfg)
    r.prepare()
    for name in ("dotdot", "symlink", "absolute"):
        assert "outside the model volume" in r.entry(name).error, name


def test_remote_code_is_never_run_unless_trusted(tmp_path: Path) -> None:
    path = tiny_models.bert(tmp_path / "bert")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "evil_bert"  # no native class: only the checkpoint's code could load it
    cfg["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModel": "modeling_evil.EvilModel",
    }
    (path / "config.json").write_text(json.dumps(cfg))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (path / name).write_text("raise SystemExit('remote code ran')\n")
    entry = load_one(path, "embedding")
    assert entry.error_class == "remote_code" and "trust_remote_code" in entry.error


@pytest.mark.parametrize("trusted", [False, True])
def test_a_native_model_type_loads_natively_whatever_auto_map_says(
    tmp_path: Path, trusted: bool
) -> None:
    """Hub configs of natively supported models (nomic_bert, gte, jina) still carry an
    auto_map; the native class is used and the checkpoint's code never runs, trusted or not."""
    path = tiny_models.bert(tmp_path / "bert")
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModel": "modeling_evil.EvilModel",
    }
    (path / "config.json").write_text(json.dumps(cfg))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (path / name).write_text("raise SystemExit('remote code ran')\n")
    entry = load_one(path, "embedding", trust_remote_code=trusted)
    assert entry.state is ModelState.READY, entry.error
    assert entry.loaded is not None
    assert type(entry.loaded.model).__module__.startswith("transformers.models.bert.")


def test_one_broken_model_does_not_stop_the_others(tmp_path: Path) -> None:
    good = tiny_models.bert(tmp_path / "good")
    broken = tiny_models.gpt2(tmp_path / "broken")
    os.truncate(broken / "model.safetensors", 50)
    cfg = parse_config(
        {
            "models": [
                spec("broken", broken, "causal-lm"),
                spec("gpu", good, "embedding", device="cuda:3"),
                spec("good", good, "embedding"),
            ]
        }
    )
    r = ModelRegistry(cfg)
    r.prepare()
    states = {e.spec.name: (e.state, e.error_class) for e in r.load_all()}
    r.close()
    assert states["good"] == (ModelState.READY, "")
    assert states["broken"] == (ModelState.FAILED, "corrupt_weights")
    assert states["gpu"][0] is ModelState.FAILED
    assert states["gpu"][1] == ("device" if not torch.cuda.is_available() else states["gpu"][1])


def test_out_of_memory_during_load_fails_that_model_only(tmp_path: Path) -> None:
    """A config far larger than memory (under an address-space limit): reported, and the
    other model still loads, in the same process."""
    good = tiny_models.bert(tmp_path / "good")
    huge = tiny_models.gpt2(tmp_path / "huge")
    cfg = json.loads((huge / "config.json").read_text())
    cfg.update(n_embd=8192, n_layer=64, n_head=64)  # ~200 GB of parameters
    (huge / "config.json").write_text(json.dumps(cfg))
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (12 * 2**30, 12 * 2**30))
        from modelcache.config import parse_config
        from modelcache.daemon.registry import ModelRegistry
        r = ModelRegistry(parse_config({{"models": [
            {{"name": "huge", "source": {str(huge)!r}, "task": "causal-lm"}},
            {{"name": "good", "source": {str(good)!r}, "task": "embedding"}}]}}))
        r.prepare()
        for e in r.load_all():
            print(e.spec.name, e.state.value, e.error_class, e.error[:80])
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert lines["huge"].startswith("failed out_of_memory out of memory while loading")
    assert lines["good"].startswith("ready")


def test_parallel_spans_read_exactly_what_safetensors_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    from modelcache.daemon import weights

    path = tiny_models.gpt2(tmp_path / "gpt2") / "model.safetensors"
    shard = weights.read_header(path)
    monkeypatch.setattr(weights, "READ_SPAN_BYTES", 4096)  # many spans, many threads
    assert shard.size > 8 * 4096
    reference = load_file(str(path))
    for threads in (1, 3, 8):
        got = weights.read_shard(shard, threads=threads)
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[k], reference[k]) for k in reference), threads


def test_a_file_that_shrinks_after_its_header_was_read_fails_with_the_file_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelcache.daemon import weights
    from modelcache.daemon.errors import ModelLoadError

    path = tiny_models.gpt2(tmp_path / "gpt2") / "model.safetensors"
    shard = weights.read_header(path)
    monkeypatch.setattr(weights, "READ_SPAN_BYTES", 4096)
    os.truncate(path, shard.size - 5000)  # the last spans come back short or empty
    with pytest.raises(ModelLoadError) as info:
        weights.read_shard(shard, threads=4)
    assert info.value.error_class == "corrupt_weights"
    assert str(path) in str(info.value) and "file shrank" in str(info.value)


def test_read_threads_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelcache.daemon import weights

    monkeypatch.setenv("MODELCACHE_READ_THREADS", "3")
    assert weights.read_threads() == 3
    monkeypatch.delenv("MODELCACHE_READ_THREADS")
    assert 1 <= weights.read_threads() <= min(8, len(os.sched_getaffinity(0)))


def test_no_thread_to_spare_means_a_sequential_read_not_a_failed_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import load_file

    from modelcache.daemon import weights

    class NoThreads(ThreadPoolExecutor):
        def submit(self, *args: object, **kwargs: object) -> Any:
            raise RuntimeError("can't start new thread")

    path = tiny_models.gpt2(tmp_path / "gpt2") / "model.safetensors"
    monkeypatch.setattr(weights, "ThreadPoolExecutor", NoThreads)
    monkeypatch.setattr(weights, "READ_SPAN_BYTES", 4096)
    got = weights.read_shard(weights.read_header(path), threads=4)
    reference = load_file(str(path))
    assert all(torch.equal(got[k], reference[k]) for k in reference)
