"""The health verdict: a pure function from two arms' aggregates (same window) to a Verdict.

Canary is compared with stable measured in the same window, never with history, using
anytime-valid statistics (`sequential`), so judging every few seconds does not inflate false
rollbacks:

- FAIL when a one-sided sequential test says the canary is worse (e-value ≥ 1/α) — error
  rate, hallucination flags, and for TTFT, end-to-end and inter-token latency the rate at
  which the canary exceeds stable's p95 — or when a confidence bound puts the canary past an
  absolute limit. A FAIL needs no minimum of requests: the tests are valid at any size.
- PASS needs evidence, not silence: `min_requests` on both arms and, for every metric, an
  upper confidence bound on canary/stable below the metric's allowed increase (for the error
  rate, or the canary's rate bounded below the absolute limit; for latencies, the median
  ratio, the tail being the exceedance test's job).
- Otherwise WAIT, with the reason.

The sequential tests run over the whole attempt (every window since the rollout started or
restarted), each window at its own traffic share; α, the attempt's false-rollback budget, is
split across metrics (`ALPHA_SHARES`).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from serve_canary.config import HealthConfig
from serve_canary.metrics import ArmAggregate, sorted_quantile
from serve_canary.sequential import (
    Segment,
    not_worse_than_e_value,
    proportion_bounds,
    quantile_margin,
    ratio_e_value,
)

Decision = Literal["pass", "wait", "fail"]
# Each metric's share of the false-rollback budget α; errors matter most and are rarest.
ALPHA_SHARES = {
    "error_rate": 0.4,
    "ttft_p95_ms": 0.15,
    "e2e_p95_ms": 0.15,
    "itl_p95_ms": 0.15,
    "hallucination_rate": 0.15,
}


@dataclass(frozen=True)
class MetricCheck:
    metric: str
    stable: float | None
    canary: float | None
    limit: float | None  # the allowed canary/stable ratio (or absolute limit) it was held to
    decision: Decision
    reason: str
    stats: dict[str, Any] = field(default_factory=dict)  # e-value, bounds, effect size, counts


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reason: str
    checks: tuple[MetricCheck, ...]
    stable_requests: int
    canary_requests: int

    def to_dict(self) -> dict:
        """JSON-ready (lists, not tuples), as it is persisted and shown."""
        return {**asdict(self), "checks": [asdict(check) for check in self.checks]}

    @property
    def failed_metrics(self) -> list[str]:
        return [check.metric for check in self.checks if check.decision == "fail"]


def _share(canary_n: int, stable_n: int) -> float:
    return canary_n / (canary_n + stable_n) if canary_n + stable_n else 0.0


def _error_segment(stable: ArmAggregate, canary: ArmAggregate) -> Segment:
    return canary.errors, stable.errors, _share(canary.requests, stable.requests)


def _hallucination_segment(stable: ArmAggregate, canary: ArmAggregate) -> Segment:
    return (
        canary.hallucinations,
        stable.hallucinations,
        _share(canary.hallucination_reports, stable.hallucination_reports),
    )


def _exceedance_segment(stable: list[float], canary: list[float]) -> Segment:
    """Samples above stable's p95 of the same window, per arm (inputs sorted)."""
    if not stable or not canary:
        return 0, 0, 0.0
    threshold = sorted_quantile(stable, 0.95)
    return (
        len(canary) - bisect_right(canary, threshold),
        len(stable) - bisect_right(stable, threshold),
        _share(len(canary), len(stable)),
    )


def _rate_check(
    metric: str,
    canary_events: int,
    canary_n: int,
    stable_events: int,
    stable_n: int,
    earlier: list[Segment],
    allowed_increase: float,
    absolute_limit: float | None,
    alpha: float,
    promotion_alpha: float,
) -> MetricCheck:
    if canary_n == 0 or stable_n == 0:
        return MetricCheck(metric, None, None, allowed_increase, "wait", "no data on one arm yet")
    share = _share(canary_n, stable_n)
    stable_rate, canary_rate = stable_events / stable_n, canary_events / canary_n
    segments = [*earlier, (canary_events, stable_events, share)]
    e_value = ratio_e_value(segments)
    promotion_e = not_worse_than_e_value(segments, allowed_increase)
    rate_lower, _ = proportion_bounds(canary_events, canary_n, alpha)
    _, rate_upper = proportion_bounds(canary_events, canary_n, promotion_alpha)
    stats = {
        "e_value": e_value,
        "e_threshold": 1.0 / alpha,
        "ratio": canary_rate / stable_rate if stable_rate else None,
        "not_worse_e_value": promotion_e,
        "not_worse_threshold": 1.0 / promotion_alpha,
        "canary_rate_bounds": [rate_lower, rate_upper],
        "canary_share": share,
        "canary_events": canary_events,
        "stable_events": stable_events,
        "canary_n": canary_n,
        "stable_n": stable_n,
    }
    args = (metric, stable_rate, canary_rate, allowed_increase)
    if e_value >= 1.0 / alpha:
        evidence = f"e-value {e_value:.3g} ≥ {1 / alpha:.3g}"
        reason = f"{metric} {canary_rate:.2%} vs stable {stable_rate:.2%}: canary worse ({evidence})"
        return MetricCheck(*args, "fail", reason, stats)
    if absolute_limit is not None and rate_lower > absolute_limit:
        bound = f"lower bound {rate_lower:.2%}"
        reason = f"{metric} {canary_rate:.2%}: above the {absolute_limit:.2%} limit with confidence ({bound})"
        return MetricCheck(*args, "fail", reason, stats)
    if promotion_e >= 1.0 / promotion_alpha:
        return MetricCheck(
            *args, "pass", f"canary/stable shown below {allowed_increase:g} (e-value {promotion_e:.3g})", stats
        )
    if absolute_limit is not None and rate_upper <= absolute_limit:
        return MetricCheck(*args, "pass", f"canary rate ≤ {rate_upper:.2%} (limit {absolute_limit:.2%})", stats)
    reason = (
        f"not enough evidence that canary/stable < {allowed_increase:g} "
        f"(e-value {promotion_e:.3g} of {1 / promotion_alpha:.3g} needed)"
    )
    if absolute_limit is not None:
        reason += f" or that the canary rate is ≤ {absolute_limit:.2%} (upper bound {rate_upper:.2%})"
    return MetricCheck(*args, "wait", reason, stats)


def _latency_check(
    metric: str,
    stable_values: list[float],
    canary_values: list[float],
    earlier: list[Segment],
    allowed_increase: float,
    absolute_limit_ms: float | None,
    alpha: float,
    promotion_alpha: float,
) -> MetricCheck:
    if not stable_values and not canary_values:
        return MetricCheck(metric, None, None, allowed_increase, "pass", "no samples on either arm: nothing to compare")
    if not stable_values or not canary_values:
        return MetricCheck(metric, None, None, allowed_increase, "wait", "no latency samples on one arm yet")
    stable, canary = sorted(stable_values), sorted(canary_values)
    canary_over, stable_over, _ = segment = _exceedance_segment(stable, canary)
    e_value = ratio_e_value([*earlier, segment])
    stable_p95, canary_p95 = sorted_quantile(stable, 0.95) * 1000.0, sorted_quantile(canary, 0.95) * 1000.0
    # Promotion bounds the median ratio: a p95 bound needs ~1,500 samples per arm to move off
    # the sample maximum, and the tail is already guarded by the exceedance test above.
    ratio_upper = sorted_quantile(canary, 0.5 + quantile_margin(len(canary), 0.5, promotion_alpha)) / max(
        sorted_quantile(stable, 0.5 - quantile_margin(len(stable), 0.5, promotion_alpha)), 1e-9
    )
    canary_p95_lower = sorted_quantile(canary, 0.95 - quantile_margin(len(canary), 0.95, alpha)) * 1000.0
    stats = {
        "e_value": e_value,
        "e_threshold": 1.0 / alpha,
        "ratio": canary_p95 / max(stable_p95, 1e-9),
        "median_ratio_upper": ratio_upper,
        "canary_p95_lower_ms": canary_p95_lower,
        "canary_over_stable_p95": canary_over,
        "stable_over_stable_p95": stable_over,
        "canary_n": len(canary),
        "stable_n": len(stable),
    }
    args = (metric, stable_p95, canary_p95, allowed_increase)
    if e_value >= 1.0 / alpha:
        reason = (
            f"{metric} {canary_p95:.1f} ms vs stable {stable_p95:.1f} ms: {canary_over}/{len(canary)} canary requests "
            f"above stable's p95 (e-value {e_value:.3g} ≥ {1 / alpha:.3g})"
        )
        return MetricCheck(*args, "fail", reason, stats)
    if absolute_limit_ms is not None and canary_p95_lower > absolute_limit_ms:
        reason = f"{metric} {canary_p95:.1f} ms: above the {absolute_limit_ms:g} ms limit with confidence"
        return MetricCheck(*args, "fail", reason, stats)
    if ratio_upper <= allowed_increase:
        return MetricCheck(
            *args, "pass", f"canary/stable median ≤ {ratio_upper:.2f} (allowed {allowed_increase:g})", stats
        )
    reason = (
        f"not enough evidence: canary/stable median could be up to {ratio_upper:.2f} (allowed {allowed_increase:g})"
    )
    return MetricCheck(*args, "wait", reason, stats)


def _hallucination_check(
    stable: ArmAggregate, canary: ArmAggregate, earlier: list[Segment], health: HealthConfig, alpha: float
) -> MetricCheck:
    """Feedback is optional and sparse: it can fail a canary, never hold one back."""
    check = _rate_check(
        "hallucination_rate",
        canary.hallucinations,
        canary.hallucination_reports,
        stable.hallucinations,
        stable.hallucination_reports,
        earlier,
        health.max_hallucination_increase,
        None,
        alpha,
        health.promotion_alpha,
    )
    if check.decision == "fail":
        return check
    return MetricCheck(
        check.metric, check.stable, check.canary, check.limit, "pass", "no evidence of more hallucinations", check.stats
    )


WindowPair = tuple[ArmAggregate, ArmAggregate]  # (stable, canary) of one window


def judge(
    stable: ArmAggregate,
    canary: ArmAggregate,
    health: HealthConfig,
    min_requests: int,
    alpha: float,
    earlier: Sequence[WindowPair] = (),
) -> Verdict:
    """Judge the current window. The sequential tests also count `earlier` windows of the same
    attempt (each at its own traffic share), so evidence carries across phase changes; the
    promotion bounds use the current window only. `alpha`, the attempt's false-rollback
    budget, is split across metrics."""
    budget = {metric: alpha * share for metric, share in ALPHA_SHARES.items()}
    promo = health.promotion_alpha
    sorted_earlier = {
        name: [
            _exceedance_segment(sorted(getattr(s, name).values), sorted(getattr(c, name).values)) for s, c in earlier
        ]
        for name in ("ttft_s", "e2e_s", "itl_s")
    }

    def latency(metric: str, name: str, increase: float, limit: float | None) -> MetricCheck:
        values = (getattr(stable, name).values, getattr(canary, name).values)
        return _latency_check(metric, *values, sorted_earlier[name], increase, limit, budget[metric], promo)

    checks = (
        _rate_check(
            "error_rate",
            canary.errors,
            canary.requests,
            stable.errors,
            stable.requests,
            [_error_segment(s, c) for s, c in earlier],
            health.max_error_rate_increase,
            health.max_error_rate,
            budget["error_rate"],
            promo,
        ),
        latency("ttft_p95_ms", "ttft_s", health.max_ttft_increase, health.max_ttft_ms),
        latency("e2e_p95_ms", "e2e_s", health.max_latency_increase, health.max_latency_ms),
        latency("itl_p95_ms", "itl_s", health.max_itl_increase, None),
        _hallucination_check(
            stable, canary, [_hallucination_segment(s, c) for s, c in earlier], health, budget["hallucination_rate"]
        ),
    )
    counts = dict(stable_requests=stable.requests, canary_requests=canary.requests)
    failed = [check for check in checks if check.decision == "fail"]
    if failed:
        return Verdict("fail", "; ".join(check.reason for check in failed), checks, **counts)
    if min(stable.requests, canary.requests) < min_requests:
        reason = (
            f"waiting for traffic: canary {canary.requests}/{min_requests}, "
            f"stable {stable.requests}/{min_requests} requests"
        )
        return Verdict("wait", reason, checks, **counts)
    waiting = [check for check in checks if check.decision == "wait"]
    if waiting:
        return Verdict("wait", "; ".join(f"{c.metric}: {c.reason}" for c in waiting), checks, **counts)
    return Verdict("pass", "every metric shown within its allowed increase", checks, **counts)
