"""The health verdict: a pure function from two arms' aggregates (same window) to a Verdict.

Canary is compared with stable measured in the same window, never with history. Too little
data is WAIT, never PASS. Each metric has an absolute limit and its own relative tolerance;
the verdict carries every metric's values, limit and reason so `status` can explain it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from serve_canary.config import HealthConfig
from serve_canary.metrics import ArmAggregate

Decision = Literal["pass", "wait", "fail"]


@dataclass(frozen=True)
class MetricCheck:
    metric: str
    stable: float | None
    canary: float | None
    limit: float | None  # the bound the canary's value is held to
    decision: Decision
    reason: str


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


def _error_rate_check(stable: ArmAggregate, canary: ArmAggregate, health: HealthConfig) -> MetricCheck:
    stable_rate, canary_rate = stable.error_rate, canary.error_rate
    if stable_rate is None or canary_rate is None:
        return MetricCheck("error_rate", stable_rate, canary_rate, None, "wait", "no requests yet")
    # Stable's rate is floored at one error in its sample: a clean stable is evidence of a
    # low rate, not of a zero rate, so one canary error alone is no regression.
    floor = max(stable_rate, 1.0 / stable.requests)
    limit = min(health.max_error_rate, floor * health.max_error_rate_increase)
    if canary_rate > limit:
        which = "absolute limit" if limit == health.max_error_rate else f"{health.max_error_rate_increase}× stable"
        reason = f"error_rate {canary_rate:.2%} above {limit:.2%} ({which})"
        return MetricCheck("error_rate", stable_rate, canary_rate, limit, "fail", reason)
    return MetricCheck("error_rate", stable_rate, canary_rate, limit, "pass", f"{canary_rate:.2%} ≤ {limit:.2%}")


def _latency_check(
    metric: str, stable_s: float | None, canary_s: float | None, max_ms: float, increase: float
) -> MetricCheck:
    if stable_s is None or canary_s is None:
        return MetricCheck(metric, stable_s, canary_s, None, "wait", "no successful requests yet")
    stable_ms, canary_ms = stable_s * 1000.0, canary_s * 1000.0
    limit = min(max_ms, stable_ms * increase)
    if canary_ms > limit:
        which = "absolute limit" if limit == max_ms else f"{increase}× stable"
        reason = f"{metric} {canary_ms:.1f} ms above {limit:.1f} ms ({which})"
        return MetricCheck(metric, stable_ms, canary_ms, limit, "fail", reason)
    return MetricCheck(metric, stable_ms, canary_ms, limit, "pass", f"{canary_ms:.1f} ms ≤ {limit:.1f} ms")


def judge(stable: ArmAggregate, canary: ArmAggregate, health: HealthConfig, min_requests: int) -> Verdict:
    """PASS only with `min_requests` on both arms and every metric within its limits."""
    checks = (
        _error_rate_check(stable, canary, health),
        _latency_check(
            "e2e_p95_ms", stable.e2e_s.quantile(0.95), canary.e2e_s.quantile(0.95),
            health.max_latency_ms, health.max_latency_increase,
        ),
        _latency_check(
            "ttft_p95_ms", stable.ttft_s.quantile(0.95), canary.ttft_s.quantile(0.95),
            health.max_ttft_ms, health.max_ttft_increase,
        ),
    )
    counts = dict(stable_requests=stable.requests, canary_requests=canary.requests)
    if min(stable.requests, canary.requests) < min_requests:
        reason = (
            f"waiting for traffic: canary {canary.requests}/{min_requests}, "
            f"stable {stable.requests}/{min_requests} requests"
        )
        return Verdict("wait", reason, checks, **counts)
    failed = [check for check in checks if check.decision == "fail"]
    if failed:
        return Verdict("fail", "; ".join(check.reason for check in failed), checks, **counts)
    waiting = [check for check in checks if check.decision == "wait"]
    if waiting:
        return Verdict("wait", "; ".join(f"{c.metric}: {c.reason}" for c in waiting), checks, **counts)
    return Verdict("pass", "every metric within its limits", checks, **counts)
