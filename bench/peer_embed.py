"""modelcache in the shared peer harness (../shared/peerbench), beside Infinity, in one run.

peerbench measures its in-process sentence-transformers anchor and the Infinity embedding
server on one deterministic corpus and reports every cell as a ratio to that anchor. Its
``grpc`` target is a placeholder; this script fills it with modelcache (``modelcache serve``
on the bundled all-MiniLM-L6-v2, the same model folder every target loads, called through
the async client: one Embed RPC per request, packed float32 on the wire) and then runs the
harness unchanged, so all three systems land in one table:

    bash ../shared/peerbench/setup.sh           # once: the Infinity venv in /tmp/peerbench
    .venv/bin/python bench/peer_embed.py run --targets inprocess,infinity,grpc \\
        --order interleaved --duration 20 --warmup 3 --json /tmp/peerbench/results.json

Every argument goes to peerbench's ``load.py`` (see its README). Loopback only.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
PEERBENCH = Path(os.environ.get("PEERBENCH_DIR", HERE.parents[1] / "shared" / "peerbench"))
sys.path.insert(0, str(PEERBENCH))
sys.path.insert(0, str(HERE))

import load  # noqa: E402  (peerbench's harness)
from bench_embed import Daemon  # noqa: E402

from modelcache.examples import default_config  # noqa: E402

MODEL = "minilm"


class ModelCacheTarget(load.Target):  # type: ignore[misc]
    name = "grpc"

    def __init__(self, args: Any) -> None:
        self.args = args
        self.daemon: Daemon | None = None
        self.client: Any = None

    async def start(self) -> None:
        from modelcache.client import AsyncModelCacheClient

        config = default_config()
        [model] = config["models"]
        if self.args.model_dir:  # the folder the other targets load
            model["source"] = str(self.args.model_dir)
        threads = str(self.args.threads or "")  # as peerbench sets them for Infinity
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} if threads else None
        self.daemon = await asyncio.to_thread(Daemon(config, env).__enter__)
        load._STARTED.append(self)
        self.client = AsyncModelCacheClient(self.daemon.address, timeout=self.args.req_timeout)
        await self.client.__aenter__()
        print(f"[grpc] modelcache pid {self.daemon.pid} serving at {self.daemon.address}")

    async def embed(self, texts: list[str]) -> np.ndarray:
        vectors: np.ndarray = await self.client.embed(MODEL, texts)
        return vectors

    async def metric_names(self) -> list[str] | None:
        import urllib.request

        if self.daemon is None:
            return None
        url = self.daemon.metrics_url()
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=10).read().decode()
        )
        return sorted({ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE ")})

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.__aexit__(None, None, None)
            self.client = None
        self.stop_sync()

    def stop_sync(self) -> None:
        if self.daemon is not None:
            self.daemon.__exit__()
            self.daemon = None

    def server_pid(self) -> int | None:
        return self.daemon.pid if self.daemon is not None else None

    def info(self) -> dict[str, Any]:
        import importlib.metadata as md

        return {
            "address": self.daemon.address if self.daemon else None,
            **{k: md.version(k) for k in ("modelcache", "torch", "transformers", "grpcio")},
        }


load.TARGETS["grpc"] = ModelCacheTarget

if __name__ == "__main__":
    sys.exit(load.main(sys.argv[1:]))
