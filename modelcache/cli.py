"""``modelcache`` command line: serve, preload, download, fetch.

Imports of torch/transformers happen inside the subcommands, after ``HF_HUB_OFFLINE=1`` is
set for the ones that must never touch the network (serve, preload): transformers reads
that variable at import time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _stop_now(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _serve(args: argparse.Namespace) -> int:
    # SIGTERM honoured from the first instant: before the event loop (and its graceful
    # handlers) exists, the imports and the model preparation can take a while, and the
    # kubelet must not wait out its grace period for a process that ignores it.
    signal.signal(signal.SIGTERM, _stop_now)
    _offline()
    from modelcache.config import load_config
    from modelcache.daemon.server import serve
    from modelcache.settings import DaemonSettings

    overrides: dict[str, Any] = {"config": args.config}
    for key in ("host", "port", "metrics_port", "metrics_host"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    settings = DaemonSettings(**overrides)
    serve(load_config(args.config), settings)
    return 0


def _fmt_seconds(stages: dict[str, float]) -> str:
    order = ("resolve", "read", "materialize", "verify", "warmup", "total")
    return " ".join(f"{k}={stages[k]:.2f}" for k in order if k in stages)


def _preload(args: argparse.Namespace) -> int:
    _offline()
    from modelcache.config import load_config
    from modelcache.daemon.loader import record_build_info, versions
    from modelcache.daemon.registry import ModelRegistry, ModelState

    registry = ModelRegistry(load_config(args.config))
    registry.prepare()
    record_build_info()
    entries = registry.load_all()
    registry.close()
    rows: list[dict[str, Any]] = []
    for e in entries:
        lm = e.loaded
        rows.append(
            {
                "name": e.spec.name,
                "task": e.spec.task,
                "device": str(lm.device) if lm else e.spec.device,
                "dtype": e.spec.dtype,
                "bytes": lm.weight_bytes if lm else 0,
                "load_seconds": e.stage_seconds,
                "fingerprint": lm.fingerprint if lm else "",
                "revision": lm.revision if lm else (e.spec.revision or ""),
                "status": e.state.value,
                "error": e.error,
                "error_class": e.error_class,
            }
        )
    failed = [e for e in entries if e.state is not ModelState.READY]
    if args.json:
        print(json.dumps({"models": rows, "versions": versions()}, indent=2))
    else:
        header = (
            f"{'NAME':<20} {'TASK':<10} {'DEVICE':<7} {'DTYPE':<9} {'BYTES':>12}  "
            f"{'FINGERPRINT':<16}  {'STATUS':<7} LOAD SECONDS"
        )
        print(header)
        for r in rows:
            print(
                f"{r['name']:<20} {r['task']:<10} {r['device']:<7} {r['dtype']:<9} "
                f"{r['bytes']:>12}  {r['fingerprint'][:16]:<16}  {r['status']:<7} "
                f"{_fmt_seconds(r['load_seconds'])}"
            )
        for r in rows:
            if r["error"]:
                print(f"\n{r['name']} failed ({r['error_class']}): {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def _download(args: argparse.Namespace) -> int:
    from modelcache.daemon.download import download
    from modelcache.daemon.errors import ModelLoadError

    try:
        dest = download(args.source, Path(args.to), revision=args.revision)
    except ModelLoadError as exc:
        print(f"download failed: {exc}", file=sys.stderr)
        return 1
    print(dest)
    return 0


def _fetch(args: argparse.Namespace) -> int:
    # PID 1 of its container: without a handler SIGTERM would be ignored and every pod
    # deletion would wait out the grace period. A download in progress leaves only a
    # .tmp-* directory, removed by the next run.
    signal.signal(signal.SIGTERM, _stop_now)
    from modelcache.config import load_config
    from modelcache.daemon.fetch import run

    root = args.to
    if root is None:
        root = load_config(args.config).model_root
        if root is None:
            print("fetch: the config has no model_root; pass --to", file=sys.stderr)
            return 2
    return run(args.config, Path(root), watch=args.watch, poll_s=args.poll_s)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelcache", description=__doc__.splitlines()[0])
    p.add_argument("--log-level", default=os.environ.get("MODELCACHE_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="load the configured models and serve them over gRPC")
    s.add_argument("--config", required=True, type=Path)
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--metrics-host", dest="metrics_host", default=None)
    s.add_argument("--metrics-port", dest="metrics_port", type=int, default=None)
    s.set_defaults(func=_serve)

    pl = sub.add_parser("preload", help="load and verify every model, print a table, exit")
    pl.add_argument("--config", required=True, type=Path)
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=_preload)

    d = sub.add_parser("download", help="fetch a model onto the model volume, atomically")
    d.add_argument("source", help="hub id (org/name) or a local directory")
    d.add_argument("--revision", help="commit sha (required for hub ids)")
    d.add_argument("--to", required=True, help="model volume root")
    d.set_defaults(func=_download)

    f = sub.add_parser(
        "fetch",
        help="download the hub models of a config onto the model volume (--watch: follow it)",
    )
    f.add_argument("--config", required=True, type=Path)
    f.add_argument("--to", type=Path, default=None, help="model volume root (default: model_root)")
    f.add_argument("--watch", action="store_true", help="run on, fetching what the config adds")
    f.add_argument("--poll-s", dest="poll_s", type=float, default=5.0)
    f.set_defaults(func=_fetch)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from modelcache.config import ConfigError

    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
