"""The anytime-valid statistics against scipy references and under repeated looks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom, binomtest

from serve_canary.sequential import (
    RHO_GRID,
    RHO_WEIGHTS,
    SHORTFALL_BETS,
    not_worse_than_e_value,
    proportion_bounds,
    quantile_margin,
    ratio_e_value,
    share_to_theta,
    shortfall_e_value,
)


def test_prior_weights_sum_to_one():
    assert math.isclose(sum(RHO_WEIGHTS), 1.0)


@pytest.mark.parametrize(
    ("canary", "stable", "share"), [(0, 0, 0.05), (3, 57, 0.05), (30, 70, 0.2), (40, 60, 0.5), (9, 1, 0.5)]
)
def test_e_value_is_the_grid_mixture_of_binomial_likelihood_ratios(canary, stable, share):
    m = canary + stable
    expected = sum(
        w * binom.pmf(canary, m, share_to_theta(rho, share)) / binom.pmf(canary, m, share)
        for rho, w in zip(RHO_GRID, RHO_WEIGHTS)
    )
    assert math.isclose(ratio_e_value([(canary, stable, share)]), expected, rel_tol=1e-9)


@pytest.mark.parametrize(("successes", "trials"), [(0, 50), (1, 100), (5, 100), (50, 100), (300, 1000), (100, 100)])
def test_confidence_sequence_contains_the_fixed_sample_clopper_pearson_interval(successes, trials):
    # Valid at every sample size at once, it must be at least as wide as scipy's
    # fixed-sample exact interval at the same level.
    lower, upper = proportion_bounds(successes, trials, 0.05)
    exact = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="exact")
    assert lower <= exact.low + 1e-9 and upper >= exact.high - 1e-9
    assert upper - lower < 3 * (exact.high - exact.low) + 0.05  # and not uselessly wide


def test_confidence_sequence_covers_the_truth_at_every_look():
    rng = np.random.default_rng(11)
    misses = 0
    runs, looks, theta, alpha = 300, 400, 0.1, 0.05
    for _ in range(runs):
        draws = rng.random(looks) < theta
        hits = np.cumsum(draws)
        for n in range(10, looks + 1, 10):
            lower, upper = proportion_bounds(int(hits[n - 1]), n, alpha)
            if not lower <= theta <= upper:
                misses += 1
                break
    assert misses / runs <= alpha


def test_e_process_false_alarm_rate_under_a_a_stays_below_alpha_at_every_look():
    """Equal rates; the e-value checked after every event for 500 events, 4000 times."""
    rng = np.random.default_rng(2026)
    alpha, runs, events = 0.05, 4000, 500
    alarms = 0
    for share in (0.05, 0.2, 0.5):
        for _ in range(runs // 3):
            from_canary = rng.random(events) < share
            canary = np.cumsum(from_canary)
            stable = np.arange(1, events + 1) - canary
            if any(ratio_e_value([(int(c), int(s), share)]) >= 1 / alpha for c, s in zip(canary[::5], stable[::5])):
                alarms += 1
    rate = alarms / (3 * (runs // 3))
    # Ville's inequality: ≤ α. A fixed-sample test looked at 100 times would be far above.
    assert rate <= alpha, rate
    assert binomtest(alarms, 3 * (runs // 3), alpha, alternative="greater").pvalue > 0.01


def test_e_process_detects_a_doubled_rate():
    rng = np.random.default_rng(5)
    share, theta = 0.2, share_to_theta(2.0, 0.2)
    detected = 0
    for _ in range(200):
        from_canary = rng.random(600) < theta
        c = int(from_canary.sum())
        detected += ratio_e_value([(c, 600 - c, share)]) >= 100
    assert detected / 200 > 0.95


@pytest.mark.parametrize("level", [0.5, 0.95])
def test_quantile_margin_shrinks_and_covers_at_every_look(level):
    assert quantile_margin(100, level, 0.05) > quantile_margin(10_000, level, 0.05) > 0
    rng = np.random.default_rng(3)
    misses = 0
    for _ in range(500):
        below = np.cumsum(rng.random(4000) <= level)
        for n in range(20, 4001, 20):
            if abs(below[n - 1] / n - level) > quantile_margin(n, level, 0.05):
                misses += 1
                break
    assert misses / 500 <= 0.05


def test_segments_multiply_likelihood_ratios_across_shares():
    one = ratio_e_value([(3, 57, 0.05), (30, 70, 0.2)])
    expected = sum(
        w
        * binom.pmf(3, 60, share_to_theta(rho, 0.05))
        / binom.pmf(3, 60, 0.05)
        * binom.pmf(30, 100, share_to_theta(rho, 0.2))
        / binom.pmf(30, 100, 0.2)
        for rho, w in zip(RHO_GRID, RHO_WEIGHTS)
    )
    assert math.isclose(one, expected, rel_tol=1e-9)


def test_e_process_across_phase_changes_keeps_its_false_alarm_rate():
    """A/A through 5 % → 20 % → 50 % phases, looked at every 5 events."""
    rng = np.random.default_rng(7)
    alpha, runs, alarms = 0.05, 1500, 0
    for _ in range(runs):
        segments, fired = [], False
        for share in (0.05, 0.2, 0.5):
            canary = stable = 0
            for _ in range(40):
                hits = int((rng.random(5) < share).sum())
                canary, stable = canary + hits, stable + 5 - hits
                if ratio_e_value([*segments, (canary, stable, share)]) >= 1 / alpha:
                    fired = True
                    break
            if fired:
                break
            segments.append((canary, stable, share))
        alarms += fired
    assert alarms / runs <= alpha


def test_not_worse_at_a_tight_tolerance_rarely_certifies_a_canary_sitting_at_it():
    """A canary exactly 1.2× stable, tested against "at least 1.2× worse" with its alternatives
    around an unchanged canary: looked at every 20 events, it is certified in at most α of runs."""
    rng = np.random.default_rng(11)
    alpha, runs, tolerance, share = 0.1, 300, 1.2, 0.5
    theta = share_to_theta(tolerance, share)
    certified = 0
    for _ in range(runs):
        from_canary = np.cumsum(rng.random(1200) < theta)
        certified += any(
            not_worse_than_e_value([(int(from_canary[n - 1]), n - int(from_canary[n - 1]), share)], tolerance, 1.0)
            >= 1 / alpha
            for n in range(20, 1201, 20)
        )
    assert certified / runs <= alpha


def test_not_worse_than_e_value_grows_for_equal_arms_and_not_for_a_worse_canary():
    equal = not_worse_than_e_value([(50, 950, 0.05), (200, 800, 0.2)], 1.5, 1.0)
    worse = not_worse_than_e_value([(100, 950, 0.05), (400, 800, 0.2)], 1.5, 1.0)
    assert equal >= 10 and worse < 1


def _shortfall_e_path(canary: np.ndarray, shortfall: np.ndarray, weight: float, margin: float) -> np.ndarray:
    """`shortfall_e_value` after each user in turn (its bets' capitals, cumulated, then mixed)."""
    gain = np.where(canary, shortfall / weight, -shortfall / (1.0 - weight)) - margin
    largest = 1.0 / (1.0 / (1.0 - weight) + margin)
    capitals = [np.exp(np.cumsum(np.log1p(f * largest * gain))) for f in SHORTFALL_BETS]
    return np.mean(capitals, axis=0)


def test_shortfall_e_value_is_its_bets_capital_averaged():
    rng = np.random.default_rng(7)
    canary, shortfall = rng.random(300) < 0.2, rng.beta(2, 5, 300)
    expected = _shortfall_e_path(canary, shortfall, 0.2, 0.1)[-1]
    got = shortfall_e_value(list(shortfall[canary]), list(shortfall[~canary]), 0.2, 0.1)
    assert math.isclose(got, expected, rel_tol=1e-9)


@pytest.mark.parametrize("weight", [0.05, 0.2, 0.5])
def test_shortfall_false_alarms_stay_below_alpha_at_every_look_on_the_null_boundary(weight):
    """Users with means of their own (Beta-distributed), the canary's exactly `margin` worse:
    the hardest null. Checked after every user for 1,000 users, 1,000 times."""
    rng = np.random.default_rng(11)
    alpha, runs, users, margin = 0.1, 1000, 1000, 0.1
    alarms = 0
    for _ in range(runs):
        canary = rng.random(users) < weight
        shortfall = np.clip(rng.beta(2, 5, users) + np.where(canary, margin, 0.0), 0.0, 1.0)
        alarms += bool((_shortfall_e_path(canary, shortfall, weight, margin) >= 1 / alpha).any())
    assert binomtest(alarms, runs, alpha, alternative="greater").pvalue > 0.01, alarms / runs


def test_shortfall_e_value_finds_users_rating_the_canary_much_lower():
    rng = np.random.default_rng(3)
    canary = rng.random(800) < 0.5
    shortfall = np.clip(rng.beta(2, 5, 800) + np.where(canary, 0.3, 0.0), 0.0, 1.0)
    assert _shortfall_e_path(canary, shortfall, 0.5, 0.1)[-1] > 1e4
