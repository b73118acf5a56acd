"""Feedback tokens: genuine, for one request, unexpired, used once; and the rate limit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serve_canary.feedback import Attribution, FeedbackRefused, RateLimit, ReplayGuard, issue, verify

KEY = b"k" * 32
ANSWER = Attribution("chatcmpl-1", "canary", "v2", "v1..v2/1/0", "00ab", expires_at=100.0)


def test_a_genuine_token_vouches_for_who_served_the_request():
    assert verify(KEY, issue(KEY, ANSWER), "chatcmpl-1", now=50.0) == ANSWER


def test_a_token_is_refused_for_another_request_after_expiry_or_under_another_key():
    token = issue(KEY, ANSWER)
    with pytest.raises(FeedbackRefused, match="another request"):
        verify(KEY, token, "chatcmpl-2", now=50.0)
    with pytest.raises(FeedbackRefused, match="expired"):
        verify(KEY, token, "chatcmpl-1", now=100.5)
    with pytest.raises(FeedbackRefused, match="not valid"):
        verify(b"x" * 32, token, "chatcmpl-1", now=50.0)


def test_changing_the_arm_in_a_token_breaks_its_signature():
    forged_payload = issue(KEY, Attribution("chatcmpl-1", "stable", "v1", "v1..v2/1/0", "00ab", 100.0)).split(".")[0]
    signature = issue(KEY, ANSWER).split(".")[1]
    with pytest.raises(FeedbackRefused, match="not valid"):
        verify(KEY, f"{forged_payload}.{signature}", "chatcmpl-1", now=50.0)


@given(st.text(max_size=300))
def test_any_string_is_refused_cleanly(token):
    with pytest.raises(FeedbackRefused):
        verify(KEY, token, "chatcmpl-1", now=50.0)


def test_each_request_is_rated_once_and_forgetting_never_allows_a_second_rating():
    guard = ReplayGuard(capacity=2)
    answers = [Attribution(f"r{i}", "canary", "v2", "w", None, expires_at=100.0 + i) for i in range(3)]
    assert guard.admit(answers[0], now=0.0) and not guard.admit(answers[0], now=1.0)
    assert guard.admit(answers[1], now=1.0) and guard.admit(answers[2], now=2.0)  # r0 is forgotten
    assert not guard.admit(answers[0], now=3.0)  # …and still cannot be rated again
    restarted = ReplayGuard(capacity=2, horizon=150.0)
    assert not restarted.admit(answers[1], now=3.0)  # answered before the restart
    assert restarted.admit(Attribution("new", "stable", "v1", "w", None, expires_at=151.0), now=3.0)


def test_the_rate_limit_allows_bursts_of_one_second_then_the_rate():
    limit = RateLimit(rate=5.0, now=0.0)
    assert [limit.allow(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert limit.allow(0.2) and not limit.allow(0.2)
