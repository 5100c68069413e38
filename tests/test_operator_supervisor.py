"""The operator's kopf supervisor: a kopf run that ends on an error is restarted, counted,
with backoff, and only a burst of failures with no stable run between them ends it."""

from __future__ import annotations

import pytest

from modelcache.metrics import OPERATOR_REGISTRY
from modelcache.operator.__main__ import supervise


class NotFound(Exception):
    """Stands in for the exception type kopf raises (the label is the type's name)."""


def _restarts(reason: str) -> float:
    value = OPERATOR_REGISTRY.get_sample_value(
        "modelcache_operator_kopf_restarts_total", {"reason": reason}
    )
    return value or 0.0


def test_a_failed_run_is_restarted_with_backoff_and_counted() -> None:
    outcomes: list[BaseException | None] = [NotFound("404"), NotFound("404"), None]
    runs: list[int] = []
    slept: list[float] = []

    def run_once() -> None:
        runs.append(1)
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    before = _restarts("NotFound")
    supervise(run_once, sleep=slept.append)
    assert len(runs) == 3  # the third run returned: a signal stopped kopf
    assert slept == [1.0, 2.0]
    assert _restarts("NotFound") == before + 2


def test_a_burst_of_failures_ends_the_process_with_the_last_error() -> None:
    runs: list[int] = []

    def run_once() -> None:
        runs.append(1)
        raise NotFound(f"run {len(runs)}")

    with pytest.raises(NotFound, match="run 4"):
        supervise(run_once, max_failed_runs=4, sleep=lambda _: None)
    assert len(runs) == 4


def test_a_stable_run_resets_the_failure_count() -> None:
    runs: list[int] = []

    def run_once() -> None:
        runs.append(1)
        if len(runs) == 6:
            return
        raise NotFound("again")

    # stable_after=0: every run counts as stable, so failures never accumulate.
    supervise(run_once, stable_after=0.0, max_failed_runs=2, sleep=lambda _: None)
    assert len(runs) == 6


def test_keyboard_interrupt_is_not_swallowed() -> None:
    def run_once() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        supervise(run_once, sleep=lambda _: None)
