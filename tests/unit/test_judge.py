"""The threshold judge's edge cases: no data, a clean stable, equal arms, each metric's limit."""

from __future__ import annotations

from serve_canary.config import HealthConfig
from serve_canary.judge import judge
from serve_canary.metrics import ArmAggregate, RequestRecord

HEALTH = HealthConfig()


def arm(requests: int, errors: int = 0, e2e_s: float = 0.5, ttft_s: float = 0.05) -> ArmAggregate:
    aggregate = ArmAggregate()
    for i in range(requests):
        failed = i < errors
        aggregate.add(RequestRecord(
            f"r{i}", "w", "stable", "v", "error" if failed else "ok", "before_first_token" if failed else None,
            None if failed else ttft_s, 0.01, e2e_s, 3, 0 if failed else 10, None if failed else "stop", 0.1,
        ))
    return aggregate


def test_zero_requests_is_wait_never_pass():
    verdict = judge(ArmAggregate(), ArmAggregate(), HEALTH, min_requests=1)
    assert verdict.decision == "wait"
    assert "canary 0/1" in verdict.reason


def test_below_min_requests_is_wait_even_when_healthy():
    verdict = judge(arm(500), arm(99), HEALTH, min_requests=100)
    assert verdict.decision == "wait" and "canary 99/100" in verdict.reason


def test_equal_arms_pass():
    verdict = judge(arm(200, 1), arm(200, 1), HEALTH, min_requests=100)
    assert verdict.decision == "pass", verdict.reason
    assert {c.metric for c in verdict.checks} == {"error_rate", "e2e_p95_ms", "ttft_p95_ms"}


def test_zero_errors_on_stable_tolerates_a_single_canary_error():
    verdict = judge(arm(200, 0), arm(200, 1), HEALTH, min_requests=100)
    assert verdict.decision == "pass", verdict.reason


def test_error_rate_above_the_absolute_limit_fails():
    verdict = judge(arm(200, 2), arm(200, 10), HEALTH, min_requests=100)
    assert verdict.decision == "fail" and verdict.failed_metrics == ["error_rate"]
    check = verdict.checks[0]
    assert (check.stable, check.canary, check.limit) == (0.01, 0.05, 0.01)


def test_error_rate_relative_tolerance_is_its_own_knob():
    health = HealthConfig(max_error_rate=0.5, max_error_rate_increase=2.0, max_latency_increase=1.1)
    assert judge(arm(1000, 10), arm(1000, 19), health, 100).decision == "pass"
    assert judge(arm(1000, 10), arm(1000, 21), health, 100).failed_metrics == ["error_rate"]


def test_latency_relative_and_absolute_limits():
    slower = judge(arm(200, e2e_s=0.5), arm(200, e2e_s=0.8), HEALTH, 100)
    assert slower.failed_metrics == ["e2e_p95_ms"] and "1.5× stable" in slower.reason
    too_slow = judge(arm(200, e2e_s=1.9), arm(200, e2e_s=2.1), HEALTH, 100)
    assert too_slow.failed_metrics == ["e2e_p95_ms"] and "absolute limit" in too_slow.reason


def test_ttft_regression_is_named():
    verdict = judge(arm(200, ttft_s=0.05), arm(200, ttft_s=0.15), HEALTH, 100)
    assert verdict.decision == "fail" and verdict.failed_metrics == ["ttft_p95_ms"]
    assert "ttft_p95_ms" in verdict.reason


def test_all_errors_on_canary_has_no_latency_but_still_fails():
    verdict = judge(arm(200), arm(200, errors=200), HEALTH, 100)
    assert verdict.decision == "fail" and "error_rate" in verdict.failed_metrics
