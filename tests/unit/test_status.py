"""The capacity finding: a canary arm too small for its weight is named, with what to scale;
throughput per replica."""

from __future__ import annotations

import pytest

from serve_canary.metrics import ArmSummary, Percentiles
from serve_canary.status import capacity_finding, tokens_per_s_per_replica


def test_a_canary_replica_taking_far_more_traffic_than_a_stable_one_is_a_finding():
    finding = capacity_finding(0.5, {"canary": 1, "stable": 4})
    assert finding is not None and "4.0×" in finding and "scale the canary to 4 replicas" in finding


@pytest.mark.parametrize(
    ("weight", "replicas"),
    [
        (0.05, {"canary": 1, "stable": 1}),
        (0.5, {"canary": 1, "stable": 1}),
        (0.5, {"canary": 2, "stable": 2}),
        (1.0, {"canary": 1, "stable": 4}),
        (0.2, {"canary": 0, "stable": 1}),
        (0.5, {}),
    ],
)
def test_an_arm_sized_for_its_share_or_unknown_counts_is_no_finding(weight, replicas):
    assert capacity_finding(weight, replicas) is None


def _summary(queue_p95_ms: float | None, output_tokens: int = 0, requests: int = 100) -> ArmSummary:
    empty = Percentiles(p50=None, p95=None, p99=None)
    return ArmSummary(
        requests=requests,
        errors=0,
        error_rate=0.0,
        error_kinds={},
        ttft_ms=empty,
        itl_ms=empty,
        e2e_ms=empty,
        queue_ms=Percentiles(p50=None, p95=queue_p95_ms, p99=None),
        tokens_per_answer=empty,
        output_tokens=output_tokens,
        mean_rating=None,
        hallucinations=0,
    )


def test_canary_requests_waiting_longer_for_a_replica_are_a_finding():
    # 20 % on one canary replica, 80 % on four stable ones: each replica takes its share.
    arms = {"stable": _summary(4.0, requests=400), "canary": _summary(420.0, requests=100)}
    finding = capacity_finding(0.2, {"canary": 1, "stable": 4}, arms)
    assert finding is not None and "queue 420 ms at p95" in finding and "scale the canary to 2" in finding
    arms = {"stable": _summary(4.0, requests=400), "canary": _summary(30.0, requests=100)}
    assert capacity_finding(0.2, {"canary": 1, "stable": 4}, arms) is None


def test_heavy_users_hashed_onto_the_canary_are_a_finding_at_a_weight_its_replicas_fit():
    """At 50 % on one replica each, the weight is balanced; in the window a few heavy users put
    three times stable's requests on the canary: that is the finding, with what to scale."""
    arms = {"stable": _summary(None, requests=300), "canary": _summary(None, requests=900)}
    finding = capacity_finding(0.5, {"canary": 1, "stable": 1}, arms)
    assert finding is not None and "took 3.0× a stable one's requests in this window" in finding
    assert "scale the canary to 3 replicas" in finding
    balanced = {"stable": _summary(None, requests=300), "canary": _summary(None, requests=330)}
    assert capacity_finding(0.5, {"canary": 1, "stable": 1}, balanced) is None
    # A window too young to say (fewer than 100 requests on an arm) is not read as load.
    young = {"stable": _summary(None, requests=20), "canary": _summary(None, requests=90)}
    assert capacity_finding(0.5, {"canary": 1, "stable": 1}, young) is None
    # Enough canary replicas for what its users send: no finding.
    assert capacity_finding(0.5, {"canary": 3, "stable": 1}, arms) is None


def test_tokens_per_second_per_replica_divides_by_the_window_and_the_running_replicas():
    arms = {"stable": _summary(None, output_tokens=12_000), "canary": _summary(None, output_tokens=3_000)}
    assert tokens_per_s_per_replica(arms, {"stable": 4, "canary": 1}, 10.0) == {"stable": 300.0, "canary": 300.0}
    assert tokens_per_s_per_replica(arms, {"stable": 4}, 10.0) == {"stable": 300.0}
