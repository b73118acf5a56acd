"""The judge's edge cases: no data, a clean stable, equal arms, each metric's test and bound."""

from __future__ import annotations

import numpy as np

from serve_canary.config import HealthConfig
from serve_canary.judge import judge
from serve_canary.metrics import ArmAggregate, RequestRecord

HEALTH = HealthConfig()
ALPHA = 0.01 / 3


def arm(
    requests: int, errors: int = 0, latency_s: float = 0.5, ttft_s: float = 0.05, seed: int = 0, spread: float = 0.2
) -> ArmAggregate:
    rng = np.random.default_rng(seed)
    aggregate = ArmAggregate()
    for i in range(requests):
        failed = i < errors
        noise = float(rng.lognormal(0.0, spread))
        aggregate.add(
            RequestRecord(
                f"r{i}",
                "w",
                "stable",
                "v",
                "error" if failed else "ok",
                "before_first_token" if failed else None,
                None if failed else ttft_s * noise,
                0.01 * noise,
                latency_s * noise,
                3,
                0 if failed else 10,
            )
        )
    return aggregate


def test_zero_requests_is_wait_never_pass():
    verdict = judge(ArmAggregate(), ArmAggregate(), HEALTH, 1, ALPHA)
    assert verdict.decision == "wait"
    assert "canary 0/1" in verdict.reason


def test_below_min_requests_is_wait_even_when_healthy():
    verdict = judge(arm(3000, seed=1), arm(99, seed=2), HEALTH, 100, ALPHA)
    assert verdict.decision == "wait" and "canary 99/100" in verdict.reason


def test_equal_arms_with_enough_data_pass_with_evidence():
    # 400 errors in all: enough to bound canary/stable below 1.5 at 1 % error rates.
    verdict = judge(arm(20_000, 200, seed=1), arm(20_000, 200, seed=2), HEALTH, 100, ALPHA)
    assert verdict.decision == "pass", verdict.reason
    assert {c.metric for c in verdict.checks} == {
        "error_rate",
        "ttft_p95_ms",
        "e2e_p95_ms",
        "itl_p95_ms",
        "hallucination_rate",
    }
    error = verdict.checks[0]
    assert error.stats.e_value < error.stats.e_threshold
    assert error.stats.not_worse_e_value >= error.stats.not_worse_threshold


def test_equal_arms_with_little_data_wait_rather_than_pass():
    verdict = judge(arm(150, 2, seed=1), arm(150, 2, seed=2), HEALTH, 100, ALPHA)
    assert verdict.decision == "wait" and "not enough evidence" in verdict.reason


def test_zero_errors_on_stable_and_one_on_canary_is_not_a_failure():
    verdict = judge(arm(2000, 0, seed=1), arm(2000, 1, seed=2), HEALTH, 100, ALPHA)
    assert verdict.decision != "fail", verdict.reason


def test_no_errors_anywhere_passes_on_the_absolute_bound():
    verdict = judge(arm(2000, 0, seed=1), arm(2000, 0, seed=2), HEALTH, 100, ALPHA)
    error = verdict.checks[0]
    assert error.decision == "pass" and "limit" in error.reason


def test_too_few_clean_requests_wait_and_say_both_ways_to_pass():
    verdict = judge(arm(2000, 0, seed=1), arm(100, 0, seed=2), HEALTH, 100, ALPHA)
    error = verdict.checks[0]
    upper = error.stats.canary_rate_bounds[1]
    assert error.decision == "wait" and upper > HEALTH.max_error_rate
    assert "canary/stable < 1.5" in error.reason and f"rate is ≤ 1.00% (upper bound {upper:.2%})" in error.reason


def test_many_more_canary_errors_fail_even_before_min_requests():
    verdict = judge(arm(2000, 20, seed=1), arm(60, 12, seed=2), HEALTH, 100, ALPHA)
    assert verdict.decision == "fail" and verdict.failed_metrics == ["error_rate"]
    assert "e-value" in verdict.reason


def test_slower_first_token_fails_naming_ttft():
    verdict = judge(arm(500, ttft_s=0.05, seed=1), arm(200, ttft_s=0.15, seed=2), HEALTH, 100, ALPHA)
    assert verdict.decision == "fail" and "ttft_p95_ms" in verdict.failed_metrics
    ttft = next(c for c in verdict.checks if c.metric == "ttft_p95_ms")
    assert ttft.stats.canary_over_stable_p95 > 150 and ttft.canary > 2 * ttft.stable


def test_absolute_latency_limit_fails_with_confidence_only():
    slow = HealthConfig(max_latency_ms=400)
    verdict = judge(arm(500, latency_s=0.5, seed=1), arm(500, latency_s=0.5, seed=2), slow, 100, ALPHA)
    assert "e2e_p95_ms" in verdict.failed_metrics and "limit with confidence" in verdict.reason


def test_hallucination_flags_can_fail_but_never_hold_back():
    stable, canary = arm(3000, 0, seed=1), arm(3000, 0, seed=2)
    assert judge(stable, canary, HEALTH, 100, ALPHA).decision == "pass"  # no feedback at all
    for _ in range(200):
        stable.add_feedback(None, False)
        canary.add_feedback(None, True)
    for _ in range(10):
        stable.add_feedback(None, True)
    verdict = judge(stable, canary, HEALTH, 100, ALPHA)
    assert verdict.failed_metrics == ["hallucination_rate"]


def test_single_token_outputs_have_no_inter_token_latency_and_do_not_block():
    stable, canary = arm(3000, seed=1), arm(3000, seed=2)
    stable.itl_s.values.clear()
    canary.itl_s.values.clear()
    itl = next(c for c in judge(stable, canary, HEALTH, 100, ALPHA).checks if c.metric == "itl_p95_ms")
    assert itl.decision == "pass"


def test_verdict_is_json_ready():
    import json

    verdict = judge(arm(300, 3, seed=1), arm(300, 3, seed=2), HEALTH, 100, ALPHA)
    assert json.loads(json.dumps(verdict.to_dict()))["checks"][0]["metric"] == "error_rate"


def test_a_closed_windows_evidence_carries_into_later_looks():
    # Neither window alone shows the canary's 4 % against stable's 1 %; both together do.
    first = judge(arm(2000, 20, seed=1), arm(200, 8, seed=2), HEALTH, 100, ALPHA)
    later = (arm(2000, 20, seed=3), arm(200, 8, seed=4))
    assert first.decision != "fail" and judge(*later, HEALTH, 100, ALPHA).decision != "fail"
    assert first.evidence["error_rate"] == (8, 20, 200 / 2200)
    verdict = judge(*later, HEALTH, 100, ALPHA, earlier=[first.evidence])
    assert verdict.failed_metrics == ["error_rate"]
