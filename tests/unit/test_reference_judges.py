"""The benchmark's Kayenta-style statistics against scipy, and its simulated world as the judge sees it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from benchmarks.judges import binary_mannwhitney_p, hodges_lehmann


@pytest.mark.parametrize(
    ("x_s", "n_s", "x_c", "n_c"), [(10, 1000, 20, 1000), (57, 5700, 6, 300), (5, 200, 1, 50), (0, 100, 3, 100)]
)
def test_binary_mann_whitney_from_counts_matches_scipy(x_s, n_s, x_c, n_c):
    stable = np.r_[np.ones(x_s), np.zeros(n_s - x_s)]
    canary = np.r_[np.ones(x_c), np.zeros(n_c - x_c)]
    expected = mannwhitneyu(canary, stable, alternative="two-sided", method="asymptotic", use_continuity=True).pvalue
    assert math.isclose(binary_mannwhitney_p(x_s, n_s, x_c, n_c), expected, rel_tol=1e-9, abs_tol=1e-12)


def test_hodges_lehmann_interval_is_where_the_shifted_test_stops_rejecting():
    rng = np.random.default_rng(4)
    stable, canary = rng.lognormal(0, 0.3, 120), rng.lognormal(0.2, 0.3, 100)
    test = hodges_lehmann(stable, canary, 0.95)
    assert math.isclose(test.p_value, mannwhitneyu(canary, stable, alternative="two-sided").pvalue)
    assert test.low < test.shift < test.high

    def p_at(shift: float) -> float:
        return mannwhitneyu(canary - shift, stable, alternative="two-sided", method="asymptotic").pvalue

    width = test.high - test.low
    assert p_at(test.shift) > 0.5
    assert p_at(test.low + 0.02 * width) > 0.04 and p_at(test.high - 0.02 * width) > 0.04
    assert p_at(test.low - 0.2 * width) < 0.05 and p_at(test.high + 0.2 * width) < 0.05


def test_the_simulated_world_feeds_the_latencies_users_wait_and_the_judge_holds_at_a_shared_slo_breach():
    from benchmarks.decision_accuracy import SCENARIOS, make_judges, run_rollout

    both_slow = next(s for s in SCENARIOS if "both over" in s.name)
    [serve_canary_judge, *_] = make_judges(both_slow)
    assert run_rollout(serve_canary_judge, both_slow, seed=1)[0] == "undecided"  # WAIT with an alert throughout
    healthy = next(s for s in SCENARIOS if s.name == "A/A")
    assert run_rollout(serve_canary_judge, healthy, seed=1)[0] == "promoted"
