"""Aggregation: bounded reservoirs with honest quantiles, per-window arms, feedback attribution."""

from __future__ import annotations

import numpy as np
import pytest

from serve_canary.metrics import MetricsLedger, RequestRecord, Reservoir, quantile
from serve_canary.routing import RoutingTable
from serve_canary.units import canary_share, hash_position


def record(
    request_id: str,
    arm: str = "canary",
    window: str = "w1",
    outcome: str = "ok",
    unit: str | None = None,
    e2e: float = 0.4,
    ttft: float | None = 0.05,
    queue: float | None = None,
) -> RequestRecord:
    version = "v2" if arm == "canary" else "v1"
    return RequestRecord(request_id, window, unit, arm, version, outcome, None, ttft, 0.01, e2e, 5, 10, queue_s=queue)


def test_quantile_matches_numpy():
    values = list(np.random.default_rng(1).lognormal(size=999))
    for q in (0.0, 0.5, 0.95, 0.99, 1.0):
        assert abs(quantile(values, q) - np.quantile(values, q)) < 1e-12
    assert quantile([], 0.5) is None


def test_reservoir_is_bounded_and_uniform():
    reservoir = Reservoir(capacity=1000, seed=3)
    for i in range(100_000):
        reservoir.add(float(i))
    assert len(reservoir.values) == 1000 and reservoir.seen == 100_000
    # A uniform sample of 0..99999 has its median near 50000.
    assert abs(reservoir.quantile(0.5) - 50_000) < 5_000


def test_ledger_keeps_windows_and_arms_apart():
    ledger = MetricsLedger()
    ledger.add([record("a"), record("b", "stable"), record("c", window="w2"), record("d", outcome="error")])
    assert ledger.window("w1")["canary"].requests == 2 and ledger.window("w1")["canary"].errors == 1
    assert ledger.window("w1")["stable"].requests == 1
    assert ledger.window("w2")["canary"].requests == 1


def test_a_cancelled_request_is_no_request_but_its_time_so_far_stays_in_the_tail():
    ledger = MetricsLedger()
    ledger.add([record("a", outcome="cancelled", e2e=9.0, ttft=None)])
    canary = ledger.window("w1")["canary"]
    assert (canary.requests, canary.cancelled) == (0, 1)
    assert canary.e2e_s.values == [9.0] and canary.ttft_s.values == [9.0]  # no first token in 9 s: TTFT ≥ 9 s


def test_a_failed_over_answer_is_not_a_stable_request():
    ledger = MetricsLedger()
    ledger.add([record("a", "canary", outcome="error"), record("a", "stable", outcome="failover")])
    canary, stable = ledger.window("w1")["canary"], ledger.window("w1")["stable"]
    assert (canary.requests, canary.errors) == (1, 1)
    assert (stable.requests, stable.failovers, stable.units.units, stable.e2e_s.seen) == (0, 1, 0, 0)


def test_units_are_users_and_keyless_requests_each_count_once():
    ledger = MetricsLedger()
    ledger.add([record(f"r{i}", outcome="error", unit="ada") for i in range(50)])
    ledger.add([record("k1", outcome="error"), record("k2"), record("r", unit="bob")])
    units = ledger.window("w1")["canary"].units
    assert (units.units, units.errors) == (4, 2)  # ada, bob, two keyless requests; ada's 50 errors count once


def test_latency_thresholds_are_fixed_once_from_stable_and_flag_units_after():
    ledger = MetricsLedger()
    ledger.add([record(f"s{i}", "stable", e2e=0.1 + i / 1000) for i in range(199)])
    assert ledger.window("w1")["stable"].units.thresholds == {}
    ledger.add([record("s199", "stable", e2e=0.299)])
    thresholds = ledger.window("w1")["canary"].units.thresholds  # shared by both arms
    assert abs(thresholds["e2e_p95"] - 0.28905) < 1e-9 and "e2e_p99" not in thresholds  # p99 needs 1,000
    ledger.add([record(f"s{i}", "stable", e2e=5.0) for i in range(200, 1000)])  # fixed: not re-estimated
    assert abs(thresholds["e2e_p95"] - 0.28905) < 1e-9 and thresholds["e2e_p99"] == 5.0
    ledger.add([record("c1", e2e=0.45, unit="ada"), record("c2", e2e=0.3, unit="ada"), record("c3", e2e=0.1)])
    canary = ledger.window("w1")["canary"].units
    assert canary.over("e2e_p95", 1.0, "inner") == 1  # ada once, by her worst request
    assert canary.over("e2e_p95", 1.5, "inner") == 1 and canary.over("e2e_p95", 1.6, "outer") == 0


def test_feedback_counts_in_the_window_and_arm_that_served_the_request():
    ledger = MetricsLedger()
    ledger.add_feedback("w1", "canary", None, rating=1.0, hallucination=True)  # before its record arrives
    ledger.add([record("a", "canary"), record("b", "stable")])
    ledger.add_feedback("w1", "stable", None, rating=5.0, hallucination=False)
    canary, stable = ledger.window("w1")["canary"], ledger.window("w1")["stable"]
    assert (canary.requests, canary.ratings, canary.rating_sum, canary.hallucinations) == (1, 1, 1.0, 1)
    assert (stable.ratings, stable.rating_sum, stable.hallucinations, stable.hallucination_reports) == (1, 5.0, 0, 1)


def test_the_ledger_keeps_only_the_latest_windows_and_reading_creates_none():
    ledger = MetricsLedger(window_capacity=2)
    assert ledger.window("never")["canary"].requests == 0 and ledger.windows == []
    for window in ("w1", "w2", "w3"):
        ledger.add([record(f"{window}-r", window=window)])
    assert ledger.windows == ["w2", "w3"]
    assert ledger.window("w1")["canary"].requests == 0


def test_a_testers_forced_request_is_never_judged():
    ledger = MetricsLedger()
    ledger.add([record("a", outcome="error")._replace(origin="tester")])
    assert ledger.windows == []


def test_waiting_for_a_replica_is_kept_apart_from_what_the_replica_took():
    ledger = MetricsLedger()
    ledger.add([record("a", ttft=0.35, e2e=0.7, queue=0.3), record("b", ttft=0.05, e2e=0.4)])
    canary = ledger.window("w1")["canary"]
    assert sorted(canary.seen("ttft").values) == [0.05, 0.35]  # what users waited
    assert sorted(canary.samples("ttft").values) == pytest.approx([0.05, 0.05])  # what the judge compares
    assert sorted(canary.samples("e2e").values) == pytest.approx([0.4, 0.4])
    assert canary.queue_s.values == [0.3]  # an unstamped request's wait is unknown, not 0
    assert canary.summary().queue_ms.p95 == 300.0


@pytest.mark.parametrize(
    ("position", "weight", "earlier", "share"),
    [
        (0.03, 0.05, (), 0.05),  # the first window: every user a fresh draw
        (0.03, 0.20, (0.05,), 1.0),  # on the canary at 5 %: on it at 20 % for sure
        (0.60, 0.20, (0.05,), 0.15 / 0.95),  # on stable at 5 %: a 15/95 chance at 20 %
        (0.30, 0.20, (0.05, 0.50), 0.15 / 0.45),  # a manual weight down: between the two earlier ones
        (0.70, 0.20, (0.05, 0.50), 0.0),  # on stable at 50 %: on stable at 20 % for sure
        (0.40, 0.50, (0.05, 0.50), 1.0),  # the same weight again: nothing new
    ],
)
def test_a_users_canary_share_is_the_part_of_its_band_the_weight_covers(position, weight, earlier, share):
    assert canary_share(position, weight, earlier) == pytest.approx(share)


def test_units_are_stratified_by_what_earlier_weights_tell_and_keyless_requests_stay_fresh():
    table = RoutingTable(1, "r", "w", "salt", 0.2, "v1", "v2", "p", "running")
    ledger = MetricsLedger()
    positions = []
    for i in range(400):
        arm, unit = table.route(f"user-{i}")
        positions.append(hash_position(unit))
        ledger.add([record(f"r{i}", arm, outcome="error", unit=unit)])
    ledger.add([record(f"k{i}", "canary", outcome="error") for i in range(7)])
    canary, stable = (ledger.window("w1")[arm].units.strata(0.2, (0.05,)) for arm in ("canary", "stable"))
    fresh = (0.2 - 0.05) / (1.0 - 0.05)  # the share of [5 %, 100 %) that 20 % covers
    assert set(stable) == {fresh} and stable[fresh].units == sum(p >= 0.2 for p in positions)
    assert set(canary) == {0.2, fresh, 1.0}
    assert canary[0.2].units == canary[0.2].errors == 7  # keyless: a fresh draw at 20 %
    assert canary[fresh].units == sum(0.05 <= p < 0.2 for p in positions)
    assert canary[1.0].units == sum(p < 0.05 for p in positions)  # on the canary at 5 % already
