"""The operator's per-ModelCache gauges, as the handlers publish them (no cluster needed)."""

from __future__ import annotations

from prometheus_client import generate_latest

from modelcache.metrics import OPERATOR_REGISTRY
from modelcache.operator import handlers


def _ready(namespace: str, name: str) -> float | None:
    value = OPERATOR_REGISTRY.get_sample_value(
        "modelcache_operator_modelcache_ready", {"namespace": namespace, "name": name}
    )
    return value


def test_ready_gauge_follows_the_phase_and_goes_with_the_resource() -> None:
    handlers._publish_phase("t-metrics", "a", "Loading")
    handlers._publish_phase("t-metrics", "b", "Ready")
    assert _ready("t-metrics", "a") == 0.0
    assert _ready("t-metrics", "b") == 1.0
    handlers._publish_phase("t-metrics", "a", "Ready")
    handlers._publish_phase("t-metrics", "b", "Degraded")
    assert (_ready("t-metrics", "a"), _ready("t-metrics", "b")) == (1.0, 0.0)

    handlers._publish_phase("t-metrics", "a", None)
    handlers._publish_phase("t-metrics", "b", None)
    handlers._publish_phase("t-metrics", "b", None)  # a repeated delete is harmless
    assert _ready("t-metrics", "a") is None and _ready("t-metrics", "b") is None
    assert 't-metrics"' not in generate_latest(OPERATOR_REGISTRY).decode()
