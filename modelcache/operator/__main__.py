"""``python -m modelcache.operator``: run the kopf operator, with peering always on.

    python -m modelcache.operator --namespace team-a [--namespace team-b]
    python -m modelcache.operator --all-namespaces

Several replicas may run: they agree through the kopf peering object (created at start-up)
and only the oldest live one handles ModelCaches; the others wait to take over.
Settings come from MODELCACHE_OPERATOR_* (see modelcache/operator/settings.py).
"""

from __future__ import annotations

import argparse

import kopf

from modelcache.operator.settings import OperatorSettings


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m modelcache.operator", description="Run the ModelCache operator (kopf)."
    )
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        help="serve ModelCaches in this namespace (repeatable)",
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="serve ModelCaches in every namespace"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    kopf.configure(verbose=args.verbose)
    from modelcache.operator import handlers  # noqa: F401 - registers the handlers

    ops = OperatorSettings()
    namespaces = tuple(args.namespaces or ())
    kopf.run(
        clusterwide=bool(args.all_namespaces),
        namespaces=namespaces,
        standalone=False,
        peering_name=ops.peering_name,
        liveness_endpoint=ops.liveness_endpoint(),
        identity=ops.identity,  # type: ignore[arg-type]
        memo=kopf.Memo(namespaces=namespaces),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
