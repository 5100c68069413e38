"""The short soak (issue #6): ``bench/soak.py`` for 60 s with 32 clients mixing Embed
(MiniLM) and LogProbs (a GPT-2 with the full 30522-token vocabulary) against a real
``modelcache serve`` process. Every answer is compared with the answer its sentences got
alone; no request may fail; the daemon's idle RSS and thread count after the window may
not exceed those before it (after a warm-up that grows the thread pools) by 5 %; and the
daemon counted exactly the successful requests the clients saw."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sixty_second_soak(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "soak.py"),
            "--seconds",
            "60",
            "--clients",
            "32",
            "--warmup",
            "10",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
    )
    print(proc.stdout)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["errors"] == {} and r["wrong"] == [], (r["errors"], r["wrong"])
    assert r["daemon_log_tracebacks"] == 0 and r["daemon_alive"]
    assert r["seconds"] >= 60 and r["ok"] >= 300, r  # it really was under load
    assert set(r["latency"]) == {"Embed", "LogProbs"}
    assert all(v["max_ms"] < 60_000 for v in r["latency"].values())  # nothing hung
    assert r["rss_growth"] < 0.05, (r["rss_start"], r["rss_end"])
    assert r["threads_end"] <= r["threads_start"] * 1.05, (r["threads_start"], r["threads_end"])
    assert r["daemon_ok"] == r["client_ok"], r  # nothing lost, nothing counted twice
    assert proc.returncode == 0, proc.stdout[-3000:]
