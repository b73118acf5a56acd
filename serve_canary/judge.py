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
restarted), each window at its own traffic share: a closed window enters as the `Segment`s
(event counts and share) of the last verdict on it, so a look never re-reads old samples.
α, the attempt's false-rollback budget, is split across metrics by `METRICS`, the one table
of what is judged (Kayenta's metrics as data).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from serve_canary.config import HealthConfig
from serve_canary.metrics import ArmAggregate, Reservoir, sorted_quantile
from serve_canary.sequential import (
    Segment,
    not_worse_than_e_value,
    proportion_bounds,
    quantile_margin,
    ratio_e_value,
)

Decision = Literal["pass", "wait", "fail"]
WindowEvidence = Mapping[str, Segment]  # metric name → the segment it contributes from one closed window
LATENCY_QUANTILE = 0.95  # the tail the latency tests watch: "exceeds stable's p95"
NO_SEGMENT: Segment = (0, 0, 0.0)


@dataclass(frozen=True)
class MetricSpec:
    """One judged metric: how to read it from an arm, what it is held to, its share of α.

    A `rate` metric counts events among trials (`counts` → (events, trials)); a `latency`
    metric reads a reservoir of seconds. `gates_promotion`: whether promotion must wait for
    evidence on it (sparse, optional feedback can fail a canary but never hold one back).
    """

    name: str
    kind: Literal["rate", "latency"]
    alpha_share: float
    allowed_increase: Callable[[HealthConfig], float]
    absolute_limit: Callable[[HealthConfig], float | None]
    counts: Callable[[ArmAggregate], tuple[int, int]] | None = None
    samples: Callable[[ArmAggregate], Reservoir] | None = None
    gates_promotion: bool = True


# Errors matter most and are rarest: the largest share of α.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "error_rate",
        "rate",
        0.4,
        allowed_increase=lambda h: h.max_error_rate_increase,
        absolute_limit=lambda h: h.max_error_rate,
        counts=lambda a: (a.errors, a.requests),
    ),
    MetricSpec(
        "ttft_p95_ms",
        "latency",
        0.15,
        allowed_increase=lambda h: h.max_ttft_increase,
        absolute_limit=lambda h: h.max_ttft_ms,
        samples=lambda a: a.ttft_s,
    ),
    MetricSpec(
        "e2e_p95_ms",
        "latency",
        0.15,
        allowed_increase=lambda h: h.max_latency_increase,
        absolute_limit=lambda h: h.max_latency_ms,
        samples=lambda a: a.e2e_s,
    ),
    MetricSpec(
        "itl_p95_ms",
        "latency",
        0.15,
        allowed_increase=lambda h: h.max_itl_increase,
        absolute_limit=lambda h: None,
        samples=lambda a: a.itl_s,
    ),
    MetricSpec(
        "hallucination_rate",
        "rate",
        0.15,
        allowed_increase=lambda h: h.max_hallucination_increase,
        absolute_limit=lambda h: None,
        counts=lambda a: (a.hallucinations, a.hallucination_reports),
        gates_promotion=False,
    ),
)


@dataclass(frozen=True)
class RateStats:
    """The evidence behind a rate check."""

    e_value: float  # "the canary's rate is higher" (rollback at e_threshold)
    e_threshold: float
    not_worse_e_value: float  # "the canary's rate is at least `limit` × stable's" (promotion at not_worse_threshold)
    not_worse_threshold: float
    ratio: float | None
    canary_rate_bounds: tuple[float, float]
    canary_share: float
    canary_events: int
    stable_events: int
    canary_n: int
    stable_n: int
    kind: Literal["rate"] = "rate"


@dataclass(frozen=True)
class LatencyStats:
    """The evidence behind a latency check (values in ms)."""

    e_value: float  # "the canary exceeds stable's p95 more often"
    e_threshold: float
    ratio: float  # canary p95 / stable p95
    median_ratio_upper: float
    canary_p95_lower_ms: float
    canary_over_stable_p95: int
    stable_over_stable_p95: int
    canary_n: int
    stable_n: int
    kind: Literal["latency"] = "latency"


@dataclass(frozen=True)
class MetricCheck:
    metric: str
    stable: float | None
    canary: float | None
    limit: float | None  # the allowed canary/stable ratio it was held to
    decision: Decision
    reason: str
    stats: RateStats | LatencyStats | None = None
    segment: Segment = NO_SEGMENT  # this window's contribution to the sequential test


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reason: str
    checks: tuple[MetricCheck, ...]
    stable_requests: int
    canary_requests: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (lists, not tuples), as it is persisted and shown."""
        return {**asdict(self), "checks": [asdict(check) for check in self.checks]}

    @property
    def failed_metrics(self) -> list[str]:
        return [check.metric for check in self.checks if check.decision == "fail"]

    @property
    def evidence(self) -> dict[str, Segment]:
        """What this window contributes to later looks once it is closed."""
        return {check.metric: check.segment for check in self.checks if check.segment != NO_SEGMENT}


def _share(canary_n: int, stable_n: int) -> float:
    return canary_n / (canary_n + stable_n) if canary_n + stable_n else 0.0


def _rate_check(
    spec: MetricSpec,
    stable: ArmAggregate,
    canary: ArmAggregate,
    earlier: list[Segment],
    health: HealthConfig,
    alpha: float,
) -> MetricCheck:
    assert spec.counts is not None
    (canary_events, canary_n), (stable_events, stable_n) = spec.counts(canary), spec.counts(stable)
    allowed, absolute_limit, promotion_alpha = (
        spec.allowed_increase(health),
        spec.absolute_limit(health),
        health.promotion_alpha,
    )
    if canary_n == 0 or stable_n == 0:
        decision: Decision = "wait" if spec.gates_promotion else "pass"
        return MetricCheck(spec.name, None, None, allowed, decision, "no data on one arm yet")
    segment = (canary_events, stable_events, _share(canary_n, stable_n))
    stable_rate, canary_rate = stable_events / stable_n, canary_events / canary_n
    e_value = ratio_e_value([*earlier, segment])
    promotion_e = not_worse_than_e_value([*earlier, segment], allowed)
    rate_lower, _ = proportion_bounds(canary_events, canary_n, alpha)
    _, rate_upper = proportion_bounds(canary_events, canary_n, promotion_alpha)
    stats = RateStats(
        e_value=e_value,
        e_threshold=1.0 / alpha,
        not_worse_e_value=promotion_e,
        not_worse_threshold=1.0 / promotion_alpha,
        ratio=canary_rate / stable_rate if stable_rate else None,
        canary_rate_bounds=(rate_lower, rate_upper),
        canary_share=segment[2],
        canary_events=canary_events,
        stable_events=stable_events,
        canary_n=canary_n,
        stable_n=stable_n,
    )

    def check(decision: Decision, reason: str) -> MetricCheck:
        return MetricCheck(spec.name, stable_rate, canary_rate, allowed, decision, reason, stats, segment)

    if e_value >= 1.0 / alpha:
        evidence = f"e-value {e_value:.3g} ≥ {1 / alpha:.3g}"
        return check("fail", f"{spec.name} {canary_rate:.2%} vs stable {stable_rate:.2%}: canary worse ({evidence})")
    if absolute_limit is not None and rate_lower > absolute_limit:
        bound = f"lower bound {rate_lower:.2%}"
        return check(
            "fail", f"{spec.name} {canary_rate:.2%}: above the {absolute_limit:.2%} limit with confidence ({bound})"
        )
    if not spec.gates_promotion:
        return check("pass", f"no evidence of a higher {spec.name}")
    if promotion_e >= 1.0 / promotion_alpha:
        return check("pass", f"canary/stable shown below {allowed:g} (e-value {promotion_e:.3g})")
    if absolute_limit is not None and rate_upper <= absolute_limit:
        return check("pass", f"canary rate ≤ {rate_upper:.2%} (limit {absolute_limit:.2%})")
    reason = (
        f"not enough evidence that canary/stable < {allowed:g} "
        f"(e-value {promotion_e:.3g} of {1 / promotion_alpha:.3g} needed)"
    )
    if absolute_limit is not None:
        reason += f" or that the canary rate is ≤ {absolute_limit:.2%} (upper bound {rate_upper:.2%})"
    return check("wait", reason)


def _latency_check(
    spec: MetricSpec,
    stable_arm: ArmAggregate,
    canary_arm: ArmAggregate,
    earlier: list[Segment],
    health: HealthConfig,
    alpha: float,
) -> MetricCheck:
    assert spec.samples is not None
    allowed, absolute_limit_ms, promotion_alpha = (
        spec.allowed_increase(health),
        spec.absolute_limit(health),
        health.promotion_alpha,
    )
    stable, canary = sorted(spec.samples(stable_arm).values), sorted(spec.samples(canary_arm).values)
    if not stable and not canary:
        return MetricCheck(spec.name, None, None, allowed, "pass", "no samples on either arm: nothing to compare")
    if not stable or not canary:
        return MetricCheck(spec.name, None, None, allowed, "wait", "no latency samples on one arm yet")
    threshold = sorted_quantile(stable, LATENCY_QUANTILE)
    canary_over, stable_over = (
        len(canary) - bisect_right(canary, threshold),
        len(stable) - bisect_right(stable, threshold),
    )
    segment = (canary_over, stable_over, _share(len(canary), len(stable)))
    e_value = ratio_e_value([*earlier, segment])
    stable_p95, canary_p95 = threshold * 1000.0, sorted_quantile(canary, LATENCY_QUANTILE) * 1000.0
    # Promotion bounds the median ratio: a p95 bound needs ~1,500 samples per arm to move off
    # the sample maximum, and the tail is already guarded by the exceedance test above.
    ratio_upper = sorted_quantile(canary, 0.5 + quantile_margin(len(canary), 0.5, promotion_alpha)) / max(
        sorted_quantile(stable, 0.5 - quantile_margin(len(stable), 0.5, promotion_alpha)), 1e-9
    )
    margin = quantile_margin(len(canary), LATENCY_QUANTILE, alpha)
    canary_p95_lower = sorted_quantile(canary, LATENCY_QUANTILE - margin) * 1000.0
    stats = LatencyStats(
        e_value=e_value,
        e_threshold=1.0 / alpha,
        ratio=canary_p95 / max(stable_p95, 1e-9),
        median_ratio_upper=ratio_upper,
        canary_p95_lower_ms=canary_p95_lower,
        canary_over_stable_p95=canary_over,
        stable_over_stable_p95=stable_over,
        canary_n=len(canary),
        stable_n=len(stable),
    )

    def check(decision: Decision, reason: str) -> MetricCheck:
        return MetricCheck(spec.name, stable_p95, canary_p95, allowed, decision, reason, stats, segment)

    if e_value >= 1.0 / alpha:
        return check(
            "fail",
            f"{spec.name} {canary_p95:.1f} ms vs stable {stable_p95:.1f} ms: {canary_over}/{len(canary)} canary "
            f"requests above stable's p95 (e-value {e_value:.3g} ≥ {1 / alpha:.3g})",
        )
    if absolute_limit_ms is not None and canary_p95_lower > absolute_limit_ms:
        return check(
            "fail", f"{spec.name} {canary_p95:.1f} ms: above the {absolute_limit_ms:g} ms limit with confidence"
        )
    if ratio_upper <= allowed:
        return check("pass", f"canary/stable median ≤ {ratio_upper:.2f} (allowed {allowed:g})")
    return check(
        "wait", f"not enough evidence: canary/stable median could be up to {ratio_upper:.2f} (allowed {allowed:g})"
    )


CHECKS = {"rate": _rate_check, "latency": _latency_check}


def judge(
    stable: ArmAggregate,
    canary: ArmAggregate,
    health: HealthConfig,
    min_requests: int,
    alpha: float,
    earlier: Sequence[WindowEvidence] = (),
) -> Verdict:
    """Judge the current window.

    The sequential tests and the rate metrics' promotion tests also count the `earlier`
    windows of the same attempt (each at its own traffic share), so evidence carries across
    phase changes; the latency promotion bound (a median ratio) uses the current window only.
    `alpha`, the attempt's false-rollback budget, is split across `METRICS`.
    """
    checks = tuple(
        CHECKS[spec.kind](
            spec,
            stable,
            canary,
            [window[spec.name] for window in earlier if spec.name in window],
            health,
            alpha * spec.alpha_share,
        )
        for spec in METRICS
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
