"""Aggregation: bounded reservoirs with honest quantiles, per-window arms, feedback attribution."""

from __future__ import annotations

import numpy as np

from serve_canary.metrics import MetricsLedger, RequestRecord, Reservoir, quantile


def record(request_id: str, arm: str = "canary", window: str = "w1", outcome: str = "ok") -> RequestRecord:
    return RequestRecord(
        request_id, window, arm, "v2" if arm == "canary" else "v1", outcome, None, 0.05, 0.01, 0.4, 5, 10
    )


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


def test_cancelled_requests_are_not_judged():
    ledger = MetricsLedger()
    ledger.add([record("a", outcome="cancelled")])
    canary = ledger.window("w1")["canary"]
    assert (canary.requests, canary.cancelled) == (0, 1)


def test_feedback_counts_in_the_window_and_arm_that_served_the_request():
    ledger = MetricsLedger()
    ledger.add_feedback("w1", "canary", rating=1.0, hallucination=True)  # before its record arrives
    ledger.add([record("a", "canary"), record("b", "stable")])
    ledger.add_feedback("w1", "stable", rating=5.0, hallucination=False)
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
