"""The health verdict: a pure function from two arms' aggregates (same window) to a Verdict.

Canary is compared with stable measured in the same window, never with history, using
anytime-valid statistics (`sequential`), so judging every few seconds does not inflate false
rollbacks. What is compared are users, the unit the router randomises (`serve_canary.units`):
a flagged unit (one that saw an error, a hallucination flag, or a latency above a threshold)
is the canary's with probability equal to the canary's weight when the canary is no
different, however its requests cluster.

- FAIL when a one-sided sequential test says the canary is worse (e-value ≥ 1/α):
  more canary users with an error or a hallucination flag than its weight explains; for TTFT,
  end-to-end and inter-token latency at p95 and p99, more canary users above
  `max_*_increase` × stable's quantile than stable users above the quantile itself (worse by
  more than the tolerance); when its users' mean rating is lower than stable's by more than
  `max_rating_decrease` of the rating range. Or when the canary is over an absolute limit with
  confidence while stable is within it; when stable is over the same limit too, the verdict is
  WAIT with an alert: a shared incident is not the canary's regression. Latencies compared
  between arms run from the replica's receipt (queueing is load, `metrics`); limits hold what
  users waited.
- PASS needs evidence, not silence: `min_requests` on both arms and,
  for every metric that gates promotion, the dual test (canary shown within the tolerance:
  for errors, a unit error rate below `max_error_rate_increase` × stable's or a request error
  rate bounded below `max_error_rate`).
- Otherwise WAIT, with the reason; `awaiting_evidence` when only those dual tests are missing.

Both tests run over the whole attempt: each closed window enters as its `Segment`s (the last
verdict's counts, by the canary share they were drawn with) as a factor of its own, which a
ratio that changes from window to window cannot turn into evidence. A user who comes back at
a later weight is no fresh draw: each window counts its users by the share of their band
between the earlier weights that its weight covers (`units.canary_share`), leaving out those
whose arm the earlier weights already tell. A rollback factor is mixed half-and-half with 1,
so a window in which stable alone had an incident costs the canary's test at most ×2; a
promotion factor is capped at 1/√promotion_alpha, so no single window (such an incident
again) can certify the canary on its own. When users come back, after a few small steps the
conditioned product has little left to learn from; promotion may then also be shown by the
current window's users alone (`_window_promotion`), each way on half of promotion_alpha.
Absolute limits and the rating comparison spend their share of α over the attempt's windows
(half, a quarter, ...).
α, the attempt's false-rollback budget, is split across `METRICS` and `LIMITS` (Kayenta's
metrics as data).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from serve_canary.config import HealthConfig
from serve_canary.metrics import ArmAggregate, sorted_quantile
from serve_canary.routing import Arm
from serve_canary.sequential import (
    Segment,
    net_rate_e_value,
    not_worse_than_e_value,
    proportion_bounds,
    quantile_margin,
    ratio_e_value,
    shortfall_e_value,
)
from serve_canary.shadow import ShadowTally
from serve_canary.units import MEASURES, QUANTILES, Census

Decision = Literal["pass", "wait", "fail"]
# A canary replica taking this much more of the window's requests than a stable one is loaded
# apart from stable (a few heavy users hashed onto it, too few replicas for its weight): its
# latencies then differ by load, which is a capacity finding, not the model's regression.
OVERLOAD = 1.25
# What one window contributes to a test: its flagged units by the share of the canary
# (`units.canary_share`) they were drawn with, one segment per share.
Evidence = tuple[Segment, ...]
PROMOTION = "/promotion"


@dataclass(frozen=True)
class WindowEvidence:
    """What a closed window contributes to later looks: per metric the rollback test's
    segments, and per metric + PROMOTION the promotion test's; and the weight it was served
    at, which tells later windows which side of it each user's hash position lay on."""

    weight: float
    segments: dict[str, Evidence]


@dataclass(frozen=True)
class MetricSpec:
    """One compared metric: which units it flags, its tolerance, its share of α.

    A `rate` metric flags units (`flagged`); a `quantile` metric reads the units' worst ratio to
    stable's quantile of a measure (`threshold`, a `units.THRESHOLD_KEYS` key). `gates_promotion`: whether
    promotion must wait for evidence on it (sparse, optional feedback can fail a canary but
    never hold one back).
    """

    name: str
    kind: Literal["rate", "quantile"]
    alpha_share: float
    allowed_increase: Callable[[HealthConfig], float]
    flagged: Callable[[Census], int] | None = None
    threshold: str | None = None
    gates_promotion: bool = True


_TOLERANCE: dict[str, Callable[[HealthConfig], float]] = {
    "ttft": lambda h: h.max_ttft_increase,
    "e2e": lambda h: h.max_latency_increase,
    "itl": lambda h: h.max_itl_increase,
    "tokens": lambda h: h.max_output_tokens_increase,
}
_SHARE = {"ttft": 0.07, "e2e": 0.07, "itl": 0.07, "tokens": 0.05}  # per quantile

# Errors matter most and are rarest: the largest share of α. Feedback is sparse and optional:
# it can fail a canary but never holds one back. So can p99: showing a p99 within its tolerance
# takes several hundred canary users per phase, the p95 a fifth of that.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "error_rate", "rate", 0.26, allowed_increase=lambda h: h.max_error_rate_increase, flagged=lambda u: u.errors
    ),
    MetricSpec(
        "hallucination_rate",
        "rate",
        0.03,
        allowed_increase=lambda h: h.max_hallucination_increase,
        flagged=lambda u: u.hallucinations,
        gates_promotion=False,
    ),
    *(
        MetricSpec(
            f"{measure}_{quantile}" + ("" if measure == "tokens" else "_ms"),
            "quantile",
            _SHARE[measure],
            allowed_increase=_TOLERANCE[measure],
            threshold=f"{measure}_{quantile}",
            gates_promotion=quantile == "p95",
        )
        for measure in MEASURES
        for quantile in QUANTILES
    ),
)


# Users' mean rating: sparse and optional, so it can fail a canary but never holds one back; its
# share is spent over the attempt's windows as a limit's is.
RATING_METRIC = "mean_rating"
RATING_ALPHA_SHARE = 0.03


@dataclass(frozen=True)
class LimitSpec:
    """An absolute limit on the canary (an SLO), read per request from the window's samples."""

    name: str
    alpha_share: float
    limit: Callable[[HealthConfig], float]
    bounds: Callable[[ArmAggregate, float], tuple[float | None, float | None]]  # (lower, upper) at α
    estimate: Callable[[ArmAggregate], float | None]
    unit: Literal["%", "ms"]


def _rate_bounds(arm: ArmAggregate, alpha: float) -> tuple[float | None, float | None]:
    if not arm.requests:
        return None, None
    worth = min(arm.units.effective_size(), arm.requests) / arm.requests  # users' requests are not independent
    return proportion_bounds(arm.errors * worth, arm.requests * worth, alpha)


def _p95_bounds(latency: Literal["ttft", "e2e"]) -> Callable[[ArmAggregate, float], tuple[float | None, float | None]]:
    def bounds(arm: ArmAggregate, alpha: float) -> tuple[float | None, float | None]:
        ordered = arm.seen(latency).ordered()
        margin = quantile_margin(int(min(len(ordered), arm.units.effective_size())), 0.95, alpha)
        low, high = 0.95 - margin, 0.95 + margin  # beyond [0, 1]: too few samples to bound it
        return (
            sorted_quantile(ordered, low) * 1000.0 if ordered and low > 0.0 else None,
            sorted_quantile(ordered, high) * 1000.0 if ordered and high < 1.0 else None,
        )

    return bounds


def _p95_ms(latency: Literal["ttft", "e2e"]) -> Callable[[ArmAggregate], float | None]:
    def estimate(arm: ArmAggregate) -> float | None:
        value = arm.seen(latency).quantile(0.95)
        return None if value is None else value * 1000.0

    return estimate


LIMITS: tuple[LimitSpec, ...] = (
    LimitSpec("error_rate_limit", 0.04, lambda h: h.max_error_rate, _rate_bounds, lambda a: a.error_rate, unit="%"),
    LimitSpec("e2e_p95_limit", 0.04, lambda h: h.max_latency_ms, _p95_bounds("e2e"), _p95_ms("e2e"), unit="ms"),
    LimitSpec("ttft_p95_limit", 0.04, lambda h: h.max_ttft_ms, _p95_bounds("ttft"), _p95_ms("ttft"), unit="ms"),
)


@dataclass(frozen=True)
class UnitStats:
    """The evidence behind a comparison of units."""

    e_value: float  # "the canary is worse by more than the tolerance" (rollback at e_threshold)
    e_threshold: float
    not_worse_e_value: float  # "the canary is at least the tolerance worse", this window (promotion at its threshold)
    not_worse_threshold: float
    canary_weight: float
    canary_flagged: int  # canary units flagged (for latency: above tolerance × stable's quantile)
    stable_flagged: int
    canary_units: int
    stable_units: int
    threshold: float | None = None  # quantile metrics: stable's quantile (ms or tokens), fixed for the window
    known_units: int = 0  # users not counted: their arm is no new draw (`units.canary_share`)
    # Users who come back across weights: the promotion test on this window's users alone
    # (`_window_promotion`), and the threshold it must reach (None: not run).
    window_e_value: float | None = None
    window_threshold: float | None = None
    kind: Literal["units"] = "units"


@dataclass(frozen=True)
class LimitStats:
    """The evidence behind an absolute limit: both arms' confidence bounds."""

    alpha: float
    canary_bounds: tuple[float | None, float | None]
    stable_bounds: tuple[float | None, float | None]
    kind: Literal["limit"] = "limit"


@dataclass(frozen=True)
class RatingStats:
    """The evidence behind the rating comparison: rated users and the betting test's e-value."""

    e_value: float  # "the canary's users rate it lower by more than the margin"
    e_threshold: float
    canary_weight: float
    canary_users: int  # users (keyless answers) with at least one rating
    stable_users: int
    canary_shortfall: float  # mean over rated users of their mean shortfall from the best rating
    stable_shortfall: float
    kind: Literal["ratings"] = "ratings"


@dataclass(frozen=True)
class PairStats:
    """The evidence behind a shadow comparison of paired answers."""

    e_value: float  # "pairs with the canary worse exceed those with stable worse by more than max_rate"
    e_threshold: float
    not_worse_e_value: float  # "... by less than max_rate" (passing the shadow phase at its threshold)
    not_worse_threshold: float
    canary_worse: int
    stable_worse: int
    pairs: int
    failed: int  # pairs the comparator raised on (not counted)
    kind: Literal["pairs"] = "pairs"


@dataclass(frozen=True)
class MetricCheck:
    metric: str
    stable: float | None
    canary: float | None
    # the tolerance (canary/stable), the absolute limit, the rating margin, or a shadow comparator's max_rate
    limit: float | None
    decision: Decision
    reason: str
    stats: UnitStats | LimitStats | RatingStats | PairStats | None = None
    segments: Evidence = ()  # this window's contribution to the rollback test
    promotion_segments: Evidence = ()  # and to the promotion test
    alert: bool = False  # both arms are over an absolute limit

    @property
    def e_value(self) -> float | None:
        """The e-value of "the canary is worse", for a check that runs a test (not a limit)."""
        return self.stats.e_value if isinstance(self.stats, UnitStats | RatingStats | PairStats) else None


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reason: str
    checks: tuple[MetricCheck, ...]
    stable_requests: int
    canary_requests: int
    # WAIT only for the tests that would show the canary within its tolerances: the traffic
    # minimums are met, no alert is raised and every comparison is running. Enough for a step
    # that leaves the canary short of full traffic (`rollout.evaluate`), not for full traffic.
    awaiting_evidence: bool = False
    weight: float = 0.0  # the canary weight the window was served at

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (lists, not tuples), as it is persisted and shown."""
        return {**asdict(self), "checks": [asdict(check) for check in self.checks]}

    @property
    def failed_metrics(self) -> list[str]:
        return [check.metric for check in self.checks if check.decision == "fail"]

    @property
    def alerts(self) -> list[str]:
        return [check.reason for check in self.checks if check.alert]

    @property
    def evidence(self) -> WindowEvidence | None:
        """What this window contributes to later looks once it is closed (None: nothing)."""
        segments = {check.metric: check.segments for check in self.checks if check.segments}
        for check in self.checks:
            if check.promotion_segments:
                segments[check.metric + PROMOTION] = check.promotion_segments
        return WindowEvidence(self.weight, segments) if segments else None


# The shadow phase's share of α, split evenly across the comparisons it judges.
SHADOW_ALPHA_SHARE = 0.04
# A comparator that fails on more than this share of pairs holds the shadow phase (it is broken).
MAX_COMPARATOR_FAILURES = 0.1


def attempt_e_value(earlier: Sequence[Evidence], current: Evidence) -> float:
    """The rollback test's e-value over the attempt: each closed window's factor mixed with 1
    (a window can cost at most ×2), times the current window's."""
    value = ratio_e_value(current)
    for segments in earlier:
        value *= (1.0 + ratio_e_value(segments)) / 2.0
    return value


def promotion_e_value(
    earlier: Sequence[Evidence], current: Evidence, tolerance: float, unchanged: float, cap: float
) -> float:
    """The promotion test's e-value: each closed window's factor capped at `cap` (so no single
    window, e.g. one in which stable alone had an incident, can certify the canary), times the
    current window's."""
    value = not_worse_than_e_value(current, tolerance, unchanged)
    for segments in earlier:
        value *= min(not_worse_than_e_value(segments, tolerance, unchanged), cap)
    return value


# The canary's and stable's units drawn with one canary share, and that share.
Stratum = tuple[Census, Census, float]


def _strata(
    stable: ArmAggregate, canary: ArmAggregate, weight: float, earlier: Sequence[WindowEvidence]
) -> list[Stratum]:
    """The window's units by the canary share they were drawn with given the earlier windows'
    weights (`units.canary_share`), leaving out those whose arm is no new draw (share 0 or 1)."""
    earlier_weights = tuple(window.weight for window in earlier)
    canary_strata = canary.units.strata(weight, earlier_weights)
    stable_strata = stable.units.strata(weight, earlier_weights)
    shares = sorted(share for share in canary_strata.keys() | stable_strata.keys() if 0.0 < share < 1.0)
    return [
        (canary_strata.get(share) or Census.empty(), stable_strata.get(share) or Census.empty(), share)
        for share in shares
    ]


def _compare(
    spec: MetricSpec,
    stable: ArmAggregate,
    canary: ArmAggregate,
    earlier: Sequence[WindowEvidence],
    strata: Sequence[Stratum],
    health: HealthConfig,
    alpha: float,
    weight: float,
    overload: float | None,
) -> MetricCheck:
    """Compare one metric over the window's `strata` (`_strata`) and the `earlier` windows'."""
    allowed, promotion_alpha = spec.allowed_increase(health), health.promotion_alpha
    unproven: Decision = "wait" if spec.gates_promotion else "pass"  # no evidence yet, either way
    every_canary, every_stable = canary.units.census(), stable.units.census()
    if spec.kind == "rate":
        assert spec.flagged is not None
        flagged = spec.flagged
        rollback = promotion = tuple((flagged(c), flagged(s), share) for c, s, share in strata)
        window = ((flagged(every_canary), flagged(every_stable), weight),)
        shown = (stable.error_rate, canary.error_rate) if spec.name == "error_rate" else (None, None)
        # An unchanged canary flags users as often as stable does.
        shown_threshold_value, tolerance, unchanged = None, allowed, 1.0
        what = "users with " + spec.name.removesuffix("_rate").replace("_", " ") + "s"
        load_sensitive = False
    else:
        assert spec.threshold is not None
        threshold = stable.units.thresholds.get(spec.threshold)
        measure, quantile = spec.threshold.split("_")
        load_sensitive = measure != "tokens"  # how long, not how much
        if threshold is None:
            if not canary.samples(measure).seen:
                return MetricCheck(spec.name, None, None, allowed, "pass", "no canary samples: nothing to compare")
            reason = "stable's quantile is not fixed yet (too few samples)"
            return MetricCheck(spec.name, None, None, allowed, unproven, reason)
        key = spec.threshold
        rollback = tuple((c.over(key, allowed, "inner"), s.over(key, 1.0, "inner"), share) for c, s, share in strata)
        promotion = tuple((c.over(key, allowed, "outer"), s.over(key, 1.0, "inner"), share) for c, s, share in strata)
        window = ((every_canary.over(key, allowed, "outer"), every_stable.over(key, 1.0, "inner"), weight),)
        level, scale = QUANTILES[quantile], 1.0 if measure == "tokens" else 1000.0
        samples = (stable.samples(measure).quantile(level), canary.samples(measure).quantile(level))
        shown = tuple(None if v is None else v * scale for v in samples)  # type: ignore[assignment]
        # The canary's users are counted above `allowed`× stable's quantile and stable's above
        # 1×, so an unchanged canary flags fewer; how many fewer depends on the tail.
        shown_threshold_value, tolerance, unchanged = threshold * scale, 1.0, 2.0 / 3.0
        shown_threshold = f"{threshold:.0f} tokens" if measure == "tokens" else f"{threshold * scale:.1f} ms"
        if measure in ("ttft", "e2e"):
            shown_threshold += " from the replica's receipt"
        what = f"users above {allowed:g}× stable's {quantile} ({shown_threshold}; stable: above 1×)"
    if canary.units.units == 0 or stable.units.units == 0:
        return MetricCheck(spec.name, *shown, allowed, unproven, "no users on one arm yet")
    e_value = attempt_e_value([w.segments[spec.name] for w in earlier if spec.name in w.segments], rollback)
    promotion_e = promotion_e_value(
        [w.segments[spec.name + PROMOTION] for w in earlier if spec.name + PROMOTION in w.segments],
        promotion,
        tolerance,
        unchanged,
        cap=promotion_alpha**-0.5,
    )
    promotion_threshold, window_e, window_threshold = 1.0 / promotion_alpha, None, None
    if earlier and (canary.units.keyed or stable.units.keyed):
        promotion_threshold, window_threshold = _window_promotion(promotion_alpha, earlier, weight)
        window_e = not_worse_than_e_value(window, tolerance, unchanged)
    canary_units, stable_units = sum(c.units for c, _, _ in strata), sum(s.units for _, s, _ in strata)
    stats = UnitStats(
        e_value=e_value,
        e_threshold=1.0 / alpha,
        not_worse_e_value=promotion_e,
        not_worse_threshold=promotion_threshold,
        canary_weight=weight,
        canary_flagged=sum(flagged for flagged, _, _ in rollback),
        stable_flagged=sum(flagged for _, flagged, _ in rollback),
        canary_units=canary_units,
        stable_units=stable_units,
        threshold=shown_threshold_value,
        known_units=canary.units.units + stable.units.units - canary_units - stable_units,
        window_e_value=window_e,
        window_threshold=window_threshold,
    )

    def check(decision: Decision, reason: str) -> MetricCheck:
        return MetricCheck(spec.name, *shown, allowed, decision, reason, stats, rollback, promotion)

    counts = (
        f"{what}: canary {stats.canary_flagged}/{canary_units}, stable {stats.stable_flagged}/{stable_units} "
        f"at weight {weight:g}"
    )
    if stats.known_units:
        counts += f"; {stats.known_units} users whose arm the earlier weights tell are not counted"
    if e_value >= 1.0 / alpha:
        worse = f"canary worse by more than {allowed:g}× ({counts}; e-value {e_value:.3g})"
        if overload is not None and load_sensitive:
            return check("wait", f"{worse}, but each canary replica took {overload:.1f}× a stable one's requests: load")
        return check("fail", f"{spec.name}: {worse}")
    if not spec.gates_promotion:
        return check("pass", f"no evidence of more {what}")
    if promotion_e >= promotion_threshold:
        return check("pass", f"canary shown within {allowed:g}× ({counts}; e-value {promotion_e:.3g})")
    if window_e is not None and window_threshold is not None and window_e >= window_threshold:
        every = f"canary {window[0][0]}/{every_canary.units}, stable {window[0][1]}/{every_stable.units}"
        return check(
            "pass",
            f"canary shown within {allowed:g}× by this window's users alone ({what}: {every} at weight "
            f"{weight:g}; e-value {window_e:.3g} of {window_threshold:.3g})",
        )
    if spec.name == "error_rate":
        _, rate_upper = _rate_bounds(canary, promotion_alpha)
        if rate_upper is not None and rate_upper <= health.max_error_rate:
            return check("pass", f"canary error rate ≤ {rate_upper:.2%} (limit {health.max_error_rate:.2%})")
    if spec.kind == "quantile":
        # Without spread on stable (every answer equally long: no unit is above stable's own
        # quantile) the comparison has no events; the quantile itself can still be shown.
        _, share_upper = proportion_bounds(
            canary.units.over(key, allowed, "outer"), canary.units.units, promotion_alpha
        )
        if share_upper <= 1.0 - level:
            return check(
                "pass",
                f"at most {share_upper:.1%} of canary users above {allowed:g}× stable's {quantile} "
                f"(≤ {1.0 - level:.0%}; {counts})",
            )
    alone = "" if window_e is None else f"; this window's users alone: e-value {window_e:.3g} of {window_threshold:.3g}"
    return check(
        "wait",
        f"not yet shown within {allowed:g}× ({counts}; e-value {promotion_e:.3g} of {promotion_threshold:.3g}{alone})",
    )


def _window_promotion(promotion_alpha: float, earlier: Sequence[WindowEvidence], weight: float) -> tuple[float, float]:
    """Thresholds when users come back across weights: (the attempt's conditioned product,
    this window's users alone), each on half of the promotion α.

    Conditioned on earlier weights, a user adds evidence only when the new weight splits its
    band, so after a few small steps the product has little left to learn from. Without the
    conditioning, the window's users are the canary's with the weight's chance over the draw
    of the router's salt, as in an attempt's first window; that bounds the chance that this
    window wrongly certifies the canary, whatever made the attempt reach it, as long as users
    come and behave alike whenever the window is opened (the assumption of every fixed-sample
    A/B test; the conditioned product and the rollback test do without it). The window's half
    is halved again for each earlier window at the same weight (a reopened window is another
    chance).
    """
    repeats = sum(1 for window in earlier if window.weight == weight)
    return 2.0 / promotion_alpha, 2.0 ** (repeats + 2) / promotion_alpha


def _limit_check(
    spec: LimitSpec, stable: ArmAggregate, canary: ArmAggregate, health: HealthConfig, alpha: float
) -> MetricCheck:
    limit = spec.limit(health)
    canary_bounds, stable_bounds = spec.bounds(canary, alpha), spec.bounds(stable, alpha)
    stats = LimitStats(alpha, canary_bounds, stable_bounds)
    values = spec.estimate(stable), spec.estimate(canary)

    def show(value: float | None) -> str:
        if value is None:
            return "—"
        return f"{value:.2%}" if spec.unit == "%" else f"{value:.1f} ms"

    def check(decision: Decision, reason: str, alert: bool = False) -> MetricCheck:
        return MetricCheck(spec.name, *values, limit, decision, reason, stats, alert=alert)

    canary_low, (_, stable_high) = canary_bounds[0], stable_bounds
    if canary_low is None or canary_low <= limit:
        return check("pass", f"canary not shown over the {show(limit)} limit")
    if stable_high is not None and stable_high <= limit:
        return check(
            "fail",
            f"{spec.name}: canary {show(values[1])} over the {show(limit)} limit with confidence "
            f"(lower bound {show(canary_low)}), stable within it ({show(values[0])})",
        )
    return check(
        "wait",
        f"both arms over the SLO: canary {show(values[1])} and stable {show(values[0])} against the "
        f"{show(limit)} limit; a shared problem, not the canary's regression",
        alert=True,
    )


def _rating_check(
    stable: ArmAggregate, canary: ArmAggregate, margin: float, alpha: float, weight: float
) -> MetricCheck:
    means = (stable.mean_rating, canary.mean_rating)
    canary_users, stable_users = canary.units.shortfalls, stable.units.shortfalls
    if not canary_users or not stable_users:
        return MetricCheck(RATING_METRIC, *means, margin, "pass", "no rated users on one arm yet")
    e_value = shortfall_e_value(canary_users, stable_users, weight, margin)
    stats = RatingStats(
        e_value,
        1.0 / alpha,
        weight,
        len(canary_users),
        len(stable_users),
        sum(canary_users) / len(canary_users),
        sum(stable_users) / len(stable_users),
    )
    counts = (
        f"mean shortfall from the best rating per user: canary {stats.canary_shortfall:.1%} of the range "
        f"({len(canary_users)} users), stable {stats.stable_shortfall:.1%} ({len(stable_users)}) at weight {weight:g}"
    )
    if e_value >= 1.0 / alpha:
        reason = f"{RATING_METRIC}: canary rated lower by more than {margin:.0%} of the range"
        reason += f" ({counts}; e-value {e_value:.3g})"
        return MetricCheck(RATING_METRIC, *means, margin, "fail", reason, stats)
    return MetricCheck(RATING_METRIC, *means, margin, "pass", f"no evidence of lower ratings ({counts})", stats)


def judge(
    stable: ArmAggregate,
    canary: ArmAggregate,
    health: HealthConfig,
    min_requests: int,
    alpha: float,
    earlier: Sequence[WindowEvidence] = (),
    *,
    weight: float,
    window_index: int = 0,
    replicas: Mapping[Arm, int] | None = None,
) -> Verdict:
    """Judge the current window, served at canary `weight` by `replicas` per arm (None: as many
    on each arm).

    The tests also count the `earlier` windows of the same attempt (`attempt_e_value`,
    `promotion_e_value`). `alpha`, the attempt's false-rollback budget, is split across `METRICS`,
    `LIMITS` and the rating comparison; a limit and the rating comparison spend 2^-(window_index + 1)
    of their share in this window.
    """
    spent = 2.0 ** -(window_index + 1)
    overload = _overload(stable, canary, replicas)
    strata = _strata(stable, canary, weight, earlier)
    compared = [
        _compare(spec, stable, canary, earlier, strata, health, alpha * spec.alpha_share, weight, overload)
        for spec in METRICS
    ]
    rating = _rating_check(stable, canary, health.max_rating_decrease, alpha * RATING_ALPHA_SHARE * spent, weight)
    limits = [_limit_check(spec, stable, canary, health, alpha * spec.alpha_share * spent) for spec in LIMITS]
    checks = (*compared, rating, *limits)
    short_of_traffic = (
        f"waiting for traffic: canary {canary.requests}/{min_requests}, "
        f"stable {stable.requests}/{min_requests} requests"
        if min(stable.requests, canary.requests) < min_requests
        else None
    )
    counts = (stable.requests, canary.requests)
    verdict = _decide(checks, counts, short_of_traffic, "every metric shown within its allowed increase")
    return replace(verdict, weight=weight)


def replica_load(stable_share: float, canary_share: float, replicas: Mapping[Arm, int]) -> float | None:
    """A canary replica's part of the traffic over a stable replica's, from each arm's share
    (a window's requests, or the weight) (None when either arm has no replica or stable no
    share)."""
    stable, canary = replicas.get("stable", 0), replicas.get("canary", 0)
    if stable_share == 0 or min(stable, canary) <= 0:
        return None
    return (canary_share / canary) / (stable_share / stable)


def _overload(stable: ArmAggregate, canary: ArmAggregate, replicas: Mapping[Arm, int] | None) -> float | None:
    """`replica_load` of the window when it is more than `OVERLOAD`."""
    ratio = replica_load(stable.requests, canary.requests, replicas or {"stable": 1, "canary": 1})
    return ratio if ratio is not None and ratio > OVERLOAD else None


def _decide(
    checks: tuple[MetricCheck, ...], counts: tuple[int, int], short_of_traffic: str | None, passed: str
) -> Verdict:
    """FAIL if any check fails; else WAIT while traffic is short or any check waits; else PASS."""
    stable_requests, canary_requests = counts
    failed = [check for check in checks if check.decision == "fail"]
    if failed:
        return Verdict("fail", "; ".join(check.reason for check in failed), checks, stable_requests, canary_requests)
    if short_of_traffic is not None:
        return Verdict("wait", short_of_traffic, checks, stable_requests, canary_requests)
    waiting = [check for check in checks if check.decision == "wait"]
    if waiting:
        reason = "; ".join(f"{c.metric}: {c.reason}" for c in waiting)
        awaiting_evidence = all(
            isinstance(c.stats, UnitStats) and c.stats.e_value < c.stats.e_threshold for c in waiting
        )
        return Verdict("wait", reason, checks, stable_requests, canary_requests, awaiting_evidence)
    return Verdict("pass", passed, checks, stable_requests, canary_requests)


def _pair_check(name: str, max_rate: float, tally: ShadowTally, alpha: float, promotion_alpha: float) -> MetricCheck:
    counts = tally.comparators.get(name)
    metric = f"shadow_{name}"
    if counts is None or counts.pairs == 0:
        return MetricCheck(metric, None, None, max_rate, "wait", "no pairs compared yet")
    pairs = counts.pairs
    rollback_e = net_rate_e_value(counts.canary_worse, counts.stable_worse, pairs, max_rate, "above")
    promotion_e = net_rate_e_value(counts.canary_worse, counts.stable_worse, pairs, max_rate, "below")
    stats = PairStats(
        rollback_e,
        1.0 / alpha,
        promotion_e,
        1.0 / promotion_alpha,
        counts.canary_worse,
        counts.stable_worse,
        pairs,
        counts.failed,
    )
    rates = (counts.stable_worse / pairs, counts.canary_worse / pairs)

    def check(decision: Decision, reason: str) -> MetricCheck:
        return MetricCheck(metric, *rates, max_rate, decision, reason, stats)

    shown = (
        f"canary's answer worse in {counts.canary_worse}/{pairs} pairs, stable's in {counts.stable_worse}/{pairs}; "
        f"allowed {max_rate:.0%} more"
    )
    if rollback_e >= 1.0 / alpha:
        return check("fail", f"{metric}: canary's answers worse ({shown}; e-value {rollback_e:.3g})")
    if counts.failed > MAX_COMPARATOR_FAILURES * (pairs + counts.failed):
        return check("wait", f"the comparator failed on {counts.failed} of {pairs + counts.failed} pairs")
    if promotion_e >= 1.0 / promotion_alpha:
        return check("pass", f"canary's answers shown not worse ({shown}; e-value {promotion_e:.3g})")
    return check("wait", f"not yet shown not worse ({shown}; e-value {promotion_e:.3g} of {1 / promotion_alpha:.3g})")


def judge_shadow(
    tally: ShadowTally, comparisons: Sequence[tuple[str, float]], health: HealthConfig, min_pairs: int
) -> Verdict:
    """Judge the shadow phase's pairs: per comparison (name, max_rate), FAIL when pairs with the
    canary's answer worse outnumber those with stable's by more than max_rate with confidence
    (its share of `SHADOW_ALPHA_SHARE` × α), PASS when every comparison is shown within it
    after `min_pairs` pairs, else WAIT."""
    alpha = health.alpha * SHADOW_ALPHA_SHARE / max(len(comparisons), 1)
    checks = tuple(_pair_check(name, rate, tally, alpha, health.promotion_alpha) for name, rate in comparisons)
    short_of_pairs = f"waiting for shadow pairs: {tally.pairs}/{min_pairs}" if tally.pairs < min_pairs else None
    return _decide(checks, (tally.pairs, tally.pairs), short_of_pairs, "every shadow comparison shown not worse")
