"""Routing properties: share, monotonicity, stability across processes, fresh cohorts per salt."""

from __future__ import annotations

import math
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest

from serve_canary.routing import RoutingTable

KEYS = [f"user-{i}" for i in range(100_000)]


def table(weight: float, salt: str = "rollout-1") -> RoutingTable:
    return RoutingTable(
        version=1,
        rollout_id="r",
        window="w",
        salt=salt,
        canary_weight=weight,
        stable_version="v1",
        canary_version="v2",
        phase="p",
        status="running",
    )


def test_canary_share_of_100k_keys_is_within_bounds_of_the_weight():
    for weight in (0.01, 0.05, 0.2, 0.5, 0.9):
        routing = table(weight)
        hits = sum(routing.arm_for(key) == "canary" for key in KEYS)
        # Two-sided exact binomial test at 1e-4: a hash that skews shares fails here.
        assert binomtest(hits, len(KEYS), weight).pvalue > 1e-4, (weight, hits)


def test_extreme_weights_are_exact():
    assert all(table(0.0).arm_for(k) == "stable" for k in KEYS[:5000])
    assert all(table(1.0).arm_for(k) == "canary" for k in KEYS[:5000])


@settings(max_examples=300)
@given(key=st.text(min_size=1, max_size=64), low=st.floats(0, 1), high=st.floats(0, 1), salt=st.text(max_size=32))
def test_monotone_no_key_moves_back_to_stable_as_the_weight_rises(key, low, high, salt):
    low, high = min(low, high), max(low, high)
    if table(low, salt).arm_for(key) == "canary":
        assert table(high, salt).arm_for(key) == "canary"


@settings(max_examples=200)
@given(key=st.text(min_size=1, max_size=64), salt=st.text(max_size=32), weight=st.floats(0, 1))
def test_a_key_is_canary_exactly_when_its_position_is_below_the_weight(key, salt, weight):
    routing = table(weight, salt)
    assert (routing.arm_for(key) == "canary") == (routing.position(key) < int(weight * 2**64))


def test_same_key_same_arm_in_a_separate_process():
    sample = KEYS[:2000]
    here = "".join("c" if table(0.37).arm_for(k) == "canary" else "s" for k in sample)
    code = (
        "from serve_canary.routing import RoutingTable as T;"
        "t=T(version=9,rollout_id='x',window='y',salt='rollout-1',canary_weight=0.37,stable_version='a',"
        "canary_version='b',phase='q',status='paused');"
        f"print(''.join('c' if t.arm_for(f'user-{{i}}')=='canary' else 's' for i in range({len(sample)})))"
    )
    # A fresh interpreter with a different hash seed: `hash()` would differ, blake2b must not.
    there = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    ).stdout.strip()
    assert there == here


def test_different_salts_choose_different_cohorts():
    a, b = table(0.2, "rollout-a"), table(0.2, "rollout-b")
    cohort_a = {k for k in KEYS if a.arm_for(k) == "canary"}
    cohort_b = {k for k in KEYS if b.arm_for(k) == "canary"}
    overlap = len(cohort_a & cohort_b) / len(cohort_a)
    # Independent cohorts overlap by about the weight (20 %), not by 100 %.
    assert math.isclose(overlap, 0.2, abs_tol=0.02)


def test_tables_pickle_with_their_hasher_rebuilt():
    import pickle

    original = table(0.3, "s")
    copy = pickle.loads(pickle.dumps(original))
    assert copy == original
    assert [copy.arm_for(k) for k in KEYS[:500]] == [original.arm_for(k) for k in KEYS[:500]]


def test_no_key_draws_at_random_per_request():
    routing = table(0.5)
    arms = [routing.arm_for(None) for _ in range(4000)]
    assert binomtest(arms.count("canary"), len(arms), 0.5).pvalue > 1e-4
