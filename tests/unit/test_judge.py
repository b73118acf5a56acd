"""The judge: users as units, tolerances both ways, absolute limits that tell a shared incident
from a regression, and the edge cases (no data, little data, sparse feedback)."""

from __future__ import annotations

import json
import random

import numpy as np
from scipy.stats import binomtest

from serve_canary.config import HealthConfig
from serve_canary.judge import METRICS, LimitStats, MetricCheck, RatingStats, UnitStats, WindowEvidence, judge
from serve_canary.metrics import ArmAggregate, MetricsLedger, RequestRecord
from serve_canary.routing import RoutingTable

HEALTH = HealthConfig()
NO_TOLERANCE = HealthConfig(max_ttft_increase=1.0, max_latency_increase=1.0, max_itl_increase=1.0)
ALPHA = 0.01
SEVEN_STEPS = (0.05, 0.10, 0.15, 0.20, 0.30, 0.40, 0.50)  # Argo's and Flagger's many small steps


def traffic(
    ledger: MetricsLedger,
    arm: str,
    requests: int,
    errors: int = 0,
    latency_s: float = 0.5,
    ttft_s: float = 0.05,
    users: int | None = None,
    seed: int = 0,
    spread: float = 0.2,
    tokens: int = 100,
    queue_s: float | None = None,
) -> None:
    """`requests` records for `arm`, the first `errors` of them failed; `users` keys them (None: keyless);
    answers of ~`tokens` output tokens; each waited ~`queue_s` for a replica (None: not stamped),
    on top of its latencies."""
    wait = (
        np.zeros(requests) if queue_s is None else queue_s * np.random.default_rng(seed + 100).uniform(0, 2, requests)
    )
    rng = np.random.default_rng(seed)
    noise = rng.lognormal(0.0, spread, requests)
    ledger.add(
        [
            RequestRecord(
                f"{arm}{i}",
                "w",
                None if users is None else f"{arm}-user{i % users}",
                arm,
                "v",
                "error" if i < errors else "ok",
                "before_first_token" if i < errors else None,
                None if i < errors else ttft_s * noise[i] + wait[i],
                0.01 * noise[i],
                latency_s * noise[i] + wait[i],
                3,
                0 if i < errors else round(tokens * noise[i]),
                queue_s=None if queue_s is None or i < errors else float(wait[i]),
            )
            for i in range(requests)
        ]
    )


def window(stable: dict, canary: dict) -> dict[str, ArmAggregate]:
    ledger = MetricsLedger()
    traffic(ledger, "stable", seed=1, **stable)
    traffic(ledger, "canary", seed=2, **canary)
    return ledger.window("w")


def verdict_on(arms: dict[str, ArmAggregate], weight: float, min_requests: int = 100, health=HEALTH, **kw):
    return judge(arms["stable"], arms["canary"], health, min_requests, ALPHA, weight=weight, **kw)


def check(verdict, metric: str):
    return next(c for c in verdict.checks if c.metric == metric)


def test_zero_requests_is_wait_never_pass():
    verdict = judge(ArmAggregate(), ArmAggregate(), HEALTH, 1, ALPHA, weight=0.05)
    assert verdict.decision == "wait" and "canary 0/1" in verdict.reason


def test_below_min_requests_is_wait_even_when_healthy():
    verdict = verdict_on(window({"requests": 3000}, {"requests": 99}), weight=0.05)
    assert verdict.decision == "wait" and "canary 99/100" in verdict.reason


def test_equal_arms_with_enough_data_pass_with_evidence():
    arms = window({"requests": 20_000, "errors": 200}, {"requests": 20_000, "errors": 200})
    verdict = verdict_on(arms, weight=0.5)
    assert verdict.decision == "pass", verdict.reason
    assert {c.metric for c in verdict.checks} == {
        "error_rate",
        "hallucination_rate",
        *(f"{latency}_{q}_ms" for latency in ("ttft", "e2e", "itl") for q in ("p95", "p99")),
        "tokens_p95",
        "tokens_p99",
        "mean_rating",
        "error_rate_limit",
        "e2e_p95_limit",
        "ttft_p95_limit",
    }
    error = check(verdict, "error_rate")
    assert isinstance(error.stats, UnitStats)
    assert error.stats.e_value < error.stats.e_threshold
    assert error.stats.not_worse_e_value >= error.stats.not_worse_threshold


def test_equal_arms_with_little_data_wait_rather_than_pass():
    verdict = verdict_on(window({"requests": 300, "errors": 3}, {"requests": 300, "errors": 3}), weight=0.5)
    assert verdict.decision == "wait" and "not yet shown within" in verdict.reason
    assert verdict.awaiting_evidence  # nothing but the proof is missing: a step short of full traffic may go


def test_a_wait_for_traffic_a_quantile_not_yet_fixed_or_an_alert_is_more_than_missing_proof():
    short = verdict_on(window({"requests": 300}, {"requests": 99}), weight=0.5)
    unfixed = verdict_on(window({"requests": 150}, {"requests": 150}), weight=0.5)
    both_slow = verdict_on(
        window({"requests": 300, "latency_s": 0.5}, {"requests": 300, "latency_s": 0.5}),
        weight=0.5,
        health=HealthConfig(max_latency_ms=400),
    )
    assert "stable's quantile is not fixed yet" in unfixed.reason and both_slow.alerts
    assert [v.decision for v in (short, unfixed, both_slow)] == ["wait"] * 3
    assert not any(v.awaiting_evidence for v in (short, unfixed, both_slow))


def test_many_more_canary_errors_fail_even_before_min_requests():
    verdict = verdict_on(window({"requests": 2000, "errors": 20}, {"requests": 60, "errors": 12}), weight=0.03)
    assert verdict.decision == "fail" and verdict.failed_metrics == ["error_rate"]
    assert "e-value" in verdict.reason


def test_one_user_whose_requests_all_fail_is_one_unit_not_a_regression():
    # Per request this is 200 canary errors against 10 on stable; per user it is 1 against 10.
    ledger = MetricsLedger()
    traffic(ledger, "stable", 2000, errors=10, seed=1)
    traffic(ledger, "canary", 200, users=1, errors=200, seed=2)
    traffic(ledger, "canary", 200, seed=3)
    verdict = verdict_on(ledger.window("w"), weight=0.17)
    assert "error_rate" not in verdict.failed_metrics, verdict.reason


def test_sticky_heterogeneous_users_keep_false_rollbacks_within_alpha():
    """A/A with users whose error rates and request counts differ wildly: rollbacks stay ≤ α.

    α = 0.3 here so that 300 trials can see a breach: the error test's share is 0.3 × 0.26.
    """
    rng = np.random.default_rng(7)
    failures = 0
    trials = 300
    for _ in range(trials):
        ledger = MetricsLedger()
        users = 60
        rates = rng.beta(0.3, 6.0, users)  # most users rarely fail, a few fail often
        volume = rng.pareto(1.2, users) * 10 + 1
        canary = rng.random(users) < 0.3
        records = []
        for user in range(users):
            n = int(volume[user])
            arm = "canary" if canary[user] else "stable"
            for i, failed in enumerate(rng.random(n) < rates[user]):
                outcome = "error" if failed else "ok"
                timing = (0.05, 0.01, 0.5, 3, 5)
                records.append(RequestRecord(f"{user}-{i}", "w", f"u{user}", arm, "v", outcome, None, *timing))
        ledger.add(records)
        arms = ledger.window("w")
        verdict = judge(arms["stable"], arms["canary"], HEALTH, 1, 0.3, weight=0.3)
        failures += "error_rate" in verdict.failed_metrics
    share = 0.3 * METRICS[0].alpha_share
    assert failures / trials <= share + 3 * (share * (1 - share) / trials) ** 0.5


def test_slower_first_token_fails_naming_ttft():
    verdict = verdict_on(window({"requests": 500, "ttft_s": 0.05}, {"requests": 200, "ttft_s": 0.15}), weight=0.3)
    assert verdict.decision == "fail" and "ttft_p95_ms" in verdict.failed_metrics
    ttft = check(verdict, "ttft_p95_ms")
    assert ttft.stats.canary_flagged > 100 and ttft.canary > 2 * ttft.stable


def test_latency_within_the_tolerance_is_not_a_rollback_and_is_shown_within_it():
    arms = window({"requests": 4000, "latency_s": 0.5}, {"requests": 4000, "latency_s": 0.6})  # +20 %, 1.5× allowed
    verdict = verdict_on(arms, weight=0.5)
    e2e = check(verdict, "e2e_p95_ms")
    assert e2e.decision == "pass", e2e.reason


def test_a_p99_only_regression_fails_on_p99():
    ledger = MetricsLedger()
    traffic(ledger, "stable", 20_000, seed=1, spread=0.1)
    traffic(ledger, "canary", 10_000, seed=2, spread=0.1)
    traffic(ledger, "canary", 300, latency_s=2.5, seed=3, spread=0.1)  # 3 % of canary requests 5× slower
    verdict = verdict_on(ledger.window("w"), weight=10_300 / 30_300)
    assert "e2e_p99_ms" in verdict.failed_metrics, check(verdict, "e2e_p99_ms").reason


def test_canary_alone_over_an_absolute_limit_fails():
    slow = HealthConfig(max_latency_ms=600, max_latency_increase=2.0)
    ledger = MetricsLedger()
    traffic(ledger, "stable", 2000, latency_s=0.3, seed=1)
    traffic(ledger, "canary", 2000, latency_s=0.55, seed=2)  # within the 2× tolerance, but over the SLO
    verdict = verdict_on(ledger.window("w"), weight=0.5, health=slow)
    assert "e2e_p95_limit" in verdict.failed_metrics and "limit with confidence" in verdict.reason


def test_both_arms_over_an_absolute_limit_is_wait_with_an_alert_not_a_rollback():
    slow = HealthConfig(max_latency_ms=400)
    arms = window({"requests": 2000, "latency_s": 0.5}, {"requests": 2000, "latency_s": 0.5})
    verdict = verdict_on(arms, weight=0.5, health=slow)
    limit = check(verdict, "e2e_p95_limit")
    assert verdict.decision == "wait" and limit.decision == "wait" and limit.alert
    assert verdict.alerts == [limit.reason] and "both arms over the SLO" in limit.reason


def test_two_latency_samples_bound_nothing():
    slow = HealthConfig(max_latency_ms=100)
    arms = window({"requests": 300, "latency_s": 0.05}, {"requests": 2, "latency_s": 0.5})
    limit = check(verdict_on(arms, weight=0.01, health=slow), "e2e_p95_limit")
    assert isinstance(limit.stats, LimitStats) and limit.stats.canary_bounds == (None, None)
    assert limit.decision == "pass"


def test_limits_spend_less_of_alpha_in_each_later_window():
    arms = window({"requests": 500}, {"requests": 500})
    alphas = [check(verdict_on(arms, weight=0.5, window_index=k), "error_rate_limit").stats.alpha for k in range(3)]
    assert alphas == [ALPHA * 0.04 / 2, ALPHA * 0.04 / 4, ALPHA * 0.04 / 8]


def test_hallucination_flags_and_low_ratings_can_fail_but_never_hold_back():
    ledger = MetricsLedger()
    traffic(ledger, "stable", 3000, seed=1)
    traffic(ledger, "canary", 3000, seed=2)
    assert verdict_on(ledger.window("w"), weight=0.5).decision == "pass"  # no feedback at all
    for i in range(200):
        ledger.add_feedback("w", "stable", f"s{i}", 5.0, False, shortfall=0.0)
        ledger.add_feedback("w", "canary", f"c{i}", 1.0, True, shortfall=1.0)
    for i in range(10):
        ledger.add_feedback("w", "stable", f"t{i}", 2.0, True, shortfall=0.75)
    verdict = verdict_on(ledger.window("w"), weight=0.5)
    assert verdict.failed_metrics == ["hallucination_rate", "mean_rating"]


def rated_users(
    ledger: MetricsLedger, weight: float, users: int, shortfall: dict[str, float], seed: int, per_user: int = 3
) -> None:
    """Sticky users, each rating `per_user` answers around a mean of its own (its arm's mean
    shortfall ± 0.2): ratings cluster by user."""
    rng = random.Random(seed)
    for user in range(users):
        arm = "canary" if rng.random() < weight else "stable"
        own = min(max(shortfall[arm] + rng.uniform(-0.2, 0.2), 0.0), 1.0)
        for _ in range(per_user):
            given = min(max(own + rng.uniform(-0.1, 0.1), 0.0), 1.0)
            ledger.add_feedback("w", arm, f"u{user}", 5.0 - 4.0 * given, None, shortfall=given)


def test_users_rating_the_canary_lower_by_more_than_the_margin_fail_it():
    ledger = MetricsLedger()
    rated_users(ledger, 0.5, 600, {"stable": 0.2, "canary": 0.5}, seed=1)  # 4.2 against 3.0 on 1–5
    rating = check(verdict_on(ledger.window("w"), weight=0.5), "mean_rating")
    assert rating.decision == "fail", rating.reason
    assert rating.stable is not None and rating.canary is not None and rating.stable - rating.canary > 1.0


def test_ratings_lower_within_the_margin_do_not_fail():
    ledger = MetricsLedger()
    rated_users(ledger, 0.5, 3000, {"stable": 0.2, "canary": 0.25}, seed=2)  # 0.05 of the range < 0.1
    rating = check(verdict_on(ledger.window("w"), weight=0.5), "mean_rating")
    assert rating.decision == "pass", rating.reason
    assert isinstance(rating.stats, RatingStats) and rating.stats.canary_users > 1000


def test_longer_answers_are_a_cost_regression():
    ledger = MetricsLedger()
    traffic(ledger, "stable", 4000, seed=1, tokens=200)
    traffic(ledger, "canary", 4000, seed=2, tokens=260)  # +30 % output tokens, same latency
    verdict = verdict_on(ledger.window("w"), weight=0.5)
    assert {"tokens_p95", "tokens_p99"} & set(verdict.failed_metrics), check(verdict, "tokens_p95").reason
    assert not {m for m in verdict.failed_metrics if m.endswith("_ms")}


def test_every_path_that_can_roll_back_spends_from_one_alpha():
    from serve_canary.judge import LIMITS, RATING_ALPHA_SHARE, SHADOW_ALPHA_SHARE

    shares = sum(spec.alpha_share for spec in (*METRICS, *LIMITS)) + RATING_ALPHA_SHARE + SHADOW_ALPHA_SHARE
    assert abs(shares - 1.0) < 1e-9


def test_single_token_outputs_have_no_inter_token_latency_and_do_not_block():
    ledger = MetricsLedger()
    traffic(ledger, "stable", 3000, seed=1)
    traffic(ledger, "canary", 3000, seed=2)
    arms = ledger.window("w")
    for aggregate in arms.values():
        aggregate.itl_s.values.clear()
        aggregate.itl_s.seen = 0
    for key in ("itl_p95", "itl_p99"):
        arms["stable"].units.thresholds.pop(key)
    verdict = verdict_on(arms, weight=0.5)
    itl = check(verdict, "itl_p95_ms")
    assert verdict.decision == "pass" and itl.decision == "pass" and "nothing to compare" in itl.reason


def test_verdict_is_json_ready():
    verdict = verdict_on(window({"requests": 300, "errors": 3}, {"requests": 300, "errors": 3}), weight=0.5)
    assert json.loads(json.dumps(verdict.to_dict()))["checks"][0]["metric"] == "error_rate"


def test_a_closed_windows_evidence_carries_into_later_looks():
    # Neither window alone shows the canary's 4 % against stable's 1 %; both together do.
    first = verdict_on(window({"requests": 2000, "errors": 20}, {"requests": 200, "errors": 8}), weight=200 / 2200)
    later = window({"requests": 2000, "errors": 20}, {"requests": 200, "errors": 8})
    assert first.decision != "fail" and verdict_on(later, weight=200 / 2200).decision != "fail"
    assert first.evidence.weight == 200 / 2200 and first.evidence.segments["error_rate"] == ((8, 20, 200 / 2200),)
    verdict = verdict_on(later, weight=200 / 2200, earlier=[first.evidence, first.evidence])
    assert verdict.failed_metrics == ["error_rate"]


def test_a_stable_incident_in_a_closed_window_costs_the_canarys_test_at_most_twice():
    incident = WindowEvidence(0.1, {"error_rate": ((2, 600, 0.1),)})  # stable failed 600 users, the canary 2
    later = window({"requests": 2000, "errors": 20}, {"requests": 200, "errors": 9})
    alone = check(verdict_on(later, weight=200 / 2200), "error_rate").stats.e_value
    after = check(verdict_on(later, weight=200 / 2200, earlier=[incident]), "error_rate").stats.e_value
    assert alone / 2 <= after < alone


def test_a_stable_incident_in_a_closed_window_cannot_certify_a_worse_canary():
    incident = WindowEvidence(0.1, {"error_rate": ((2, 600, 0.1),), "error_rate/promotion": ((2, 600, 0.1),)})
    worse = window({"requests": 20_000, "errors": 200}, {"requests": 20_000, "errors": 400})
    verdict = verdict_on(worse, weight=0.5, earlier=[incident, incident, incident])
    error = check(verdict, "error_rate")
    assert error.decision != "pass" and error.stats.not_worse_e_value < error.stats.not_worse_threshold


def test_an_unchanged_canary_is_shown_within_a_tight_error_tolerance():
    # 1 % errors on both arms, 40,000 requests each at weight 0.5, tolerance 1.2: the evidence
    # against "1.2× worse" is counted where an unchanged canary sits (1×), not at a share of 1.2.
    tight = HealthConfig(max_error_rate_increase=1.2)
    arms = window({"requests": 40_000, "errors": 400}, {"requests": 40_000, "errors": 400})
    error = check(verdict_on(arms, weight=0.5, health=tight), "error_rate")
    assert error.decision == "pass", error.reason
    assert error.stats.not_worse_e_value >= error.stats.not_worse_threshold


def test_answers_all_alike_on_both_arms_can_still_be_shown_within_the_tolerance():
    arms = window({"requests": 2000, "spread": 0.0}, {"requests": 2000, "spread": 0.0})
    verdict = verdict_on(arms, weight=0.5)
    assert verdict.decision == "pass", verdict.reason
    assert "of canary users above 1.2× stable's p95" in check(verdict, "tokens_p95").reason


def test_sticky_users_with_their_own_speeds_keep_latency_false_rollbacks_within_alpha():
    """A/A where each user has a speed of their own (some always slow): the latency tests,
    per user, stay within their α share (α = 0.3 here: 0.021 per latency check), even with no
    tolerance (any slower canary counts). The same test per request (canary requests above
    stable's p95 at the realised share) rolls back 58 of these 200 trials."""
    rng = np.random.default_rng(11)
    trials, failures = 200, 0
    for _ in range(trials):
        ledger = MetricsLedger()
        users = 80
        speed = rng.lognormal(0.0, 0.6, users)  # per-user latency multiplier
        volume = (rng.pareto(1.2, users) * 8 + 1).astype(int)
        canary = rng.random(users) < 0.3
        order = rng.permutation(np.repeat(np.arange(users), volume))
        records = [
            RequestRecord(
                f"{i}",
                "w",
                f"u{u}",
                "canary" if canary[u] else "stable",
                "v",
                "ok",
                None,
                0.05 * speed[u] * rng.lognormal(0, 0.2),
                0.01,
                0.5 * speed[u] * rng.lognormal(0, 0.2),
                3,
                10,
            )
            for i, u in enumerate(order)
        ]
        ledger.add(records)
        arms = ledger.window("w")
        verdict = judge(arms["stable"], arms["canary"], NO_TOLERANCE, 1, 0.3, weight=0.3)
        failures += any(m.endswith("_ms") for m in verdict.failed_metrics)
    # 6 latency checks at 0.021 each: at most 0.126 by the union bound
    assert failures / trials <= 0.126 + 3 * (0.126 * 0.874 / trials) ** 0.5


def test_canary_requests_waiting_for_a_replica_are_load_not_a_slower_model():
    """The canary arm is short of replicas: its users wait ~0.3 s more to reach one, which
    doubles their TTFT and adds to their end-to-end time. The model is the same."""
    arms = window({"requests": 6000, "queue_s": 0.0}, {"requests": 6000, "queue_s": 0.3})
    seen = arms["canary"].seen("ttft").quantile(0.95), arms["stable"].seen("ttft").quantile(0.95)
    assert seen[0] > 3 * seen[1]  # what users of the canary saw
    verdict = verdict_on(arms, weight=0.5)
    assert not [m for m in verdict.failed_metrics if m.startswith(("ttft", "e2e"))], verdict.reason
    assert check(verdict, "ttft_p95_ms").decision == "pass"


def test_a_model_slower_at_the_replica_is_still_caught_whatever_the_queue():
    arms = window({"requests": 6000, "queue_s": 0.2}, {"requests": 6000, "ttft_s": 0.15, "queue_s": 0.0})
    assert "ttft_p95_ms" in verdict_on(arms, weight=0.5).failed_metrics


def test_absolute_limits_hold_what_users_waited_queueing_included():
    health = HEALTH.model_copy(update={"max_ttft_ms": 200.0})
    arms = window({"requests": 3000, "queue_s": 0.0}, {"requests": 3000, "queue_s": 0.3})
    assert "ttft_p95_limit" in verdict_on(arms, weight=0.5, health=health).failed_metrics


def test_a_canary_replica_loaded_apart_from_stable_is_not_rolled_back_for_latency_but_held():
    # Weight 0.5, but a few heavy users hashed onto the canary: its one replica takes 3× the
    # requests of stable's, and answers 2× slower under that load.
    arms = window({"requests": 1000}, {"requests": 3000, "latency_s": 1.0, "ttft_s": 0.1})
    loaded = verdict_on(arms, weight=0.5)
    assert loaded.decision == "wait" and not loaded.awaiting_evidence, loaded.reason
    e2e = check(loaded, "e2e_p95_ms")
    assert e2e.decision == "wait" and "each canary replica took 3.0× a stable one's requests: load" in e2e.reason
    # The same traffic on three canary replicas is one replica's worth each: a slower model.
    scaled = verdict_on(arms, weight=0.5, replicas={"stable": 1, "canary": 3})
    assert scaled.decision == "fail" and "e2e_p95_ms" in scaled.failed_metrics
    # Errors and answer lengths do not depend on load.
    erring = window({"requests": 1000, "errors": 10}, {"requests": 3000, "errors": 300})
    assert "error_rate" in verdict_on(erring, weight=0.5).failed_metrics


def test_users_who_come_back_at_each_weight_are_not_counted_as_fresh_draws():
    """A/A through seven weights (Argo's and Flagger's many small steps): the same 30 users
    fail every request on either arm and come back in every window, routed by the router's
    own salted hash. A user on the canary at 5 % is on it at every later weight, so counting
    it as a fresh draw in each window compounds one unlucky hash; conditioning on what the
    earlier weights tell keeps the error test's false rollbacks within its share of α."""
    users, trials = 30, 1500
    alpha_share = ALPHA * next(spec.alpha_share for spec in METRICS if spec.name == "error_rate")
    rolled_back = 0
    for trial in range(trials):
        earlier: list[WindowEvidence] = []
        for weight in SEVEN_STEPS:
            table = RoutingTable(1, "r", "w", f"salt-{trial}", weight, "v1", "v2", "p", "running")
            arms = {"stable": ArmAggregate(), "canary": ArmAggregate()}
            for user in range(users):
                arm, unit = table.route(f"user-{user}")
                arms[arm].requests += 1
                arms[arm].units.add(unit, True, {})
            if min(a.requests for a in arms.values()) == 0:
                continue
            verdict = verdict_on(arms, weight=weight, min_requests=1, earlier=earlier)
            if "error_rate" in verdict.failed_metrics:
                rolled_back += 1
                break
            if verdict.evidence is not None:
                earlier.append(verdict.evidence)
    assert binomtest(rolled_back, trials, alpha_share, alternative="greater").pvalue > 0.001, rolled_back


def _seven_steps(salt: str, users: int, stable_error: float, canary_error: float, seed: int) -> MetricCheck:
    """Keyed users (one request each per window) through the seven weights up to 50 %, routed
    by the router's salted hash; the last window's error check, the earlier windows carried."""
    rng = random.Random(seed)
    earlier: list[WindowEvidence] = []
    for weight in SEVEN_STEPS:
        table = RoutingTable(1, "r", "w", salt, weight, "v1", "v2", "p", "running")
        arms = {"stable": ArmAggregate(), "canary": ArmAggregate()}
        for user in range(users):
            arm, unit = table.route(f"user-{user}")
            arms[arm].requests += 1
            arms[arm].units.add(unit, rng.random() < (canary_error if arm == "canary" else stable_error), {})
        verdict = verdict_on(arms, weight=weight, min_requests=1, earlier=earlier)
        if verdict.evidence is not None:
            earlier.append(verdict.evidence)
    return check(verdict, "error_rate")


def test_users_who_came_back_at_every_weight_still_show_an_unchanged_canary_within_its_tolerance():
    """A rollout of the decision-accuracy benchmark that stayed undecided (A/A, 2,000 sticky
    users, seven weights up to 50 %): the earlier windows' few split users carried little, and
    at 50 % after 40 % only the users between count, each the canary's with a 1/6 chance. The
    window's users alone, at its weight, show the canary within 1.5×."""
    shares = (0.05, 0.05 / 0.95, 0.05 / 0.9, 0.05 / 0.85, 0.1 / 0.8, 0.1 / 0.7)
    counts = ((2, 42), (3, 34), (0, 31), (3, 36), (2, 44), (5, 28))
    earlier = [
        WindowEvidence(weight, {"error_rate/promotion": ((canary, stable, share),)})
        for weight, (canary, stable), share in zip(SEVEN_STEPS[:-1], counts, shares, strict=True)
    ]

    def users(arms: dict[str, ArmAggregate], arm: str, low: float, high: float, count: int, failing: int) -> None:
        for i in range(count):
            unit = f"{int((low + (high - low) * (i + 0.5) / count) * 2**64):016x}"  # its hash position
            arms[arm].requests += 1
            arms[arm].errors += i < failing
            arms[arm].units.add(unit, i < failing, {})

    def last_window(between: int, failing: int) -> MetricCheck:
        arms = {"stable": ArmAggregate(), "canary": ArmAggregate()}
        users(arms, "canary", 0.0, 0.4, 800, 130)  # on the canary since 5 %: no new draw
        users(arms, "canary", 0.4, 0.5, between, failing)
        users(arms, "stable", 0.5, 1.0, 965, 160)
        return check(verdict_on(arms, weight=0.5, min_requests=1, earlier=earlier), "error_rate")

    error = last_window(191, 41)
    assert error.stats.not_worse_e_value < error.stats.not_worse_threshold  # the conditioned product
    assert error.decision == "pass", error.reason
    assert "by this window's users alone" in error.reason
    assert error.stats.window_e_value >= error.stats.window_threshold
    worse = last_window(191, 50)  # more of the canary's users fail: neither way shows it, and the reason says both
    assert worse.decision == "wait" and "this window's users alone: e-value" in worse.reason, worse.reason


def test_the_window_alone_rarely_certifies_a_canary_at_its_tolerance():
    """A canary whose users fail 1.5× as often (at the tolerance: it must not be shown within
    it) through the same seven weights: certified in at most the promotion α."""
    trials = 150
    certified = sum(_seven_steps(f"salt-{trial}", 2000, 0.2, 0.3, trial).decision == "pass" for trial in range(trials))
    assert binomtest(certified, trials, HEALTH.promotion_alpha, alternative="greater").pvalue > 0.001, certified
