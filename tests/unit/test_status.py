"""The capacity finding: a canary arm too small for its weight is named, with what to scale."""

from __future__ import annotations

import pytest

from serve_canary.status import capacity_finding


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
