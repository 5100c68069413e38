"""``python -m modelcache.operator``: run the kopf operator, with peering always on.

    python -m modelcache.operator --namespace team-a [--namespace team-b]
    python -m modelcache.operator --all-namespaces

Several replicas may run: they agree through the kopf peering object (created at start-up)
and only the oldest live one handles ModelCaches; the others wait to take over.
Settings come from MODELCACHE_OPERATOR_* (see modelcache/operator/settings.py).

kopf ends the whole operator when one watch stream fails with an error it does not retry.
A Kubernetes API server that has just restarted answers 404 for custom resources until it
has registered their CRDs again (kubernetes/kubernetes#71218; seen here on every few
restarts), so ``main`` runs kopf under a supervisor: a run that ends on an exception is
counted (``modelcache_operator_kopf_restarts_total``) and started again after a backoff,
and only a run of failures with no stable period between them ends the process (then the
kubelet's restart policy takes over).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

import kopf

from modelcache.metrics import OPERATOR_KOPF_RESTARTS
from modelcache.operator.settings import OperatorSettings

log = logging.getLogger("modelcache.operator")
#: A kopf run that lasted this long was healthy: the failure count starts again.
STABLE_AFTER_S = 300.0
#: Consecutive failed runs (each shorter than STABLE_AFTER_S) before the process gives up.
MAX_FAILED_RUNS = 5


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

    def run_once() -> None:
        kopf.run(
            clusterwide=bool(args.all_namespaces),
            namespaces=namespaces,
            standalone=False,
            peering_name=ops.peering_name,
            liveness_endpoint=ops.liveness_endpoint(),
            identity=ops.identity,  # type: ignore[arg-type]
            memo=kopf.Memo(namespaces=namespaces),
        )

    supervise(run_once)
    return 0


def supervise(
    run_once: Callable[[], None],
    *,
    stable_after: float = STABLE_AFTER_S,
    max_failed_runs: int = MAX_FAILED_RUNS,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Run ``run_once`` until it returns (a signal stopped kopf); restart it when it raises.

    Backoff 1, 2, 4, ... s (at most 30); ``max_failed_runs`` failures in a row, none after
    a stable run, re-raise the last one.
    """
    failed = 0
    while True:
        started = time.monotonic()
        try:
            run_once()
            return
        except Exception as exc:
            failed = 1 if time.monotonic() - started >= stable_after else failed + 1
            if failed >= max_failed_runs:
                log.critical("kopf failed %d times in a row; exiting: %r", failed, exc)
                raise
            delay = min(2.0 ** (failed - 1), 30.0)
            OPERATOR_KOPF_RESTARTS.labels(type(exc).__name__).inc()
            log.error(
                "kopf stopped on %s: %s; restarting it in %.0fs (failure %d of %d)",
                type(exc).__name__,
                exc,
                delay,
                failed,
                max_failed_runs,
            )
            sleep(delay)


if __name__ == "__main__":
    raise SystemExit(main())
